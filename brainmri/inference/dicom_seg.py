"""The mask of a DICOM patient as a DICOM Segmentation (SEG) object, encoded by highdicom.

One binary segment, "tumor" (SNOMED CT: morphologically abnormal structure / neoplasm), one frame
per slice of the FLAIR series it references: every frame carries the source slice's position and
the SOP instance it was derived from, so viewers lay the SEG over the series. The SEG's UIDs are
derived from the source series' UID (the same input gives the same file).
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from brainmri import __version__
from brainmri.inference.dicom_io import DicomSeries

logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies


def segmentation(series: DicomSeries, mask: np.ndarray) -> hd.seg.Segmentation:
    """``mask``: ``(columns, rows, slices)`` in the series' voxel order (as the NIfTI mask)."""
    frames = np.ascontiguousarray(np.transpose(mask.astype(bool), (2, 1, 0))).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="brainmri volume prediction",
        version=__version__,
        family=codes.DCM.ArtificialIntelligence,
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="tumor",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    return hd.seg.Segmentation(
        source_images=series.headers,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(entropy_srcs=[series.uid, "brainmri-seg-series"]),
        series_number=int(series.headers[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(entropy_srcs=[series.uid, "brainmri-seg-instance"]),
        instance_number=1,
        manufacturer="brainmri",
        manufacturer_model_name="brainmri volume prediction",
        software_versions=__version__,
        device_serial_number="0",
        series_description="brainmri tumor segmentation",
        omit_empty_frames=False,  # one frame per source slice, empty ones included
    )


def write_segmentation(series: DicomSeries, mask: np.ndarray, path: Path) -> None:
    segmentation(series, mask).save_as(path)
