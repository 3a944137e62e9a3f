"""Synthetic DICOM MR series written with pydicom, with a known geometry (for the DICOM tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

STUDY = generate_uid(entropy_srcs=["test study"])
FRAME = generate_uid(entropy_srcs=["test frame of reference"])


def lps_affine(origin, row_dir, col_dir, spacing, step) -> np.ndarray:
    """Voxel (column i, row j, slice k) -> LPS mm of the series write_series makes."""
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(row_dir, float) * spacing[1]
    affine[:3, 1] = np.asarray(col_dir, float) * spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return affine


def array_affine(count, origin, row_dir, col_dir, spacing, thickness, reverse=False):
    """The LPS affine of voxel (i, j, k) of the array write_series is given."""
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    step = np.cross(row_dir, col_dir) * thickness
    origin = np.asarray(origin, float)
    if reverse:
        origin, step = origin + (count - 1) * step, -step
    return lps_affine(origin, row_dir, col_dir, spacing, step)


def write_series(
    folder: Path,
    voxels: np.ndarray,
    description: str,
    *,
    origin=(-40.0, -30.0, 10.0),
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    spacing=(1.0, 1.0),
    thickness=2.0,
    seed=0,
    series_number=1,
    bits=16,
    reverse=False,
) -> tuple[str, np.ndarray]:
    """Slices ``voxels[:, :, k]`` ((columns, rows, slices)) at ``origin + k * thickness *
    normal`` (``reverse``: at ``origin + (n - 1 - k) * thickness * normal``), in files with
    shuffled names and shuffled InstanceNumbers; -> (series UID, the LPS affine of voxel
    (i, j, k) of ``voxels``)."""
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    step = normal * thickness
    series = generate_uid(entropy_srcs=[STUDY, description, str(seed)])
    rng = np.random.default_rng(seed)
    count = voxels.shape[2]
    names = rng.permutation(count)
    instances = rng.permutation(count) + 1
    dtype = np.uint8 if bits == 8 else np.uint16
    for k in range(count):
        uid = generate_uid(entropy_srcs=[series, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY, series, FRAME
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^P", "P1", "", "O"
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20000101", "000000", ""
        ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer = "", "MR", "test"
        ds.SeriesDescription, ds.SeriesNumber = description, series_number
        ds.InstanceNumber = int(instances[k])
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        place = count - 1 - k if reverse else k
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + place * step]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(thickness)
        ds.Rows, ds.Columns = voxels.shape[1], voxels.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(voxels[:, :, k].T.astype(dtype)).tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}", enforce_file_format=True)
    affine = array_affine(count, origin, row_dir, col_dir, spacing, thickness, reverse)
    return series, affine
