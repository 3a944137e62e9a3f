"""The frame size a compressed DICOM codestream will decode to, read from its own header.

A 3 KB JPEG-LS file whose DICOM header says 64 x 64 can hold a codestream of 16384 x 16384:
decoders trust the codestream and allocate what it asks. So before any pixel data are decoded,
the codestream's own header (JPEG and JPEG-LS: the SOF segment; JPEG 2000: the SIZ segment;
RLE: the number of segments) is read and must agree with ``Rows``, ``Columns`` and
``SamplesPerPixel``.
"""

from __future__ import annotations

import struct

from brainmri.errors import InputError

JPEG_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57")
JPEG_SYNTAXES += ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
JPEG2000_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
JPEG2000_SYNTAXES += ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202")
JPEG2000_SYNTAXES += ("1.2.840.10008.1.2.4.203",)
RLE_SYNTAX = "1.2.840.10008.1.2.5"
# Start-of-frame markers: JPEG SOF0-SOF15 without DHT (C4), JPG (C8) and DAC (CC); JPEG-LS SOF55.
SOF_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RSTn)


def jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) of a JPEG or JPEG-LS codestream's SOF segment."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("no JPEG start-of-image marker")
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in STANDALONE:
            position += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in SOF_MARKERS:
            if position + 10 > len(data):
                break
            rows, columns = struct.unpack(">HH", data[position + 5 : position + 9])
            return rows, columns, data[position + 9]
        position += 2 + length
    raise ValueError("no JPEG frame header (SOF) before the scan")


def jpeg2000_frame(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) of a JPEG 2000 codestream's SIZ segment (also inside a JP2
    file, where the codestream follows the boxes)."""
    start = data.find(b"\xff\x4f\xff\x51")
    if start < 0 or start + 42 > len(data):
        raise ValueError("no JPEG 2000 SIZ segment")
    fields = struct.unpack(">HHIIII", data[start + 4 : start + 24])
    _, _, width, height, x_offset, y_offset = fields
    (components,) = struct.unpack(">H", data[start + 40 : start + 42])
    return height - y_offset, width - x_offset, components


def check_frame(
    path: object, syntax: str, frame: bytes, rows: int, columns: int, samples: int, bits: int
) -> None:
    """InputError unless the compressed ``frame`` decodes to ``rows x columns x samples``
    (``syntax``: the transfer syntax UID, a pydicom UID or its text)."""
    name = getattr(syntax, "name", syntax)
    syntax = str(syntax)
    try:
        if syntax in JPEG_SYNTAXES:
            found = jpeg_frame(frame)
        elif syntax in JPEG2000_SYNTAXES:
            found = jpeg2000_frame(frame)
        elif syntax == RLE_SYNTAX:
            if len(frame) < 64:
                raise ValueError("an RLE header is 64 bytes")
            (segments,) = struct.unpack("<I", frame[:4])
            expected = samples * max(1, bits // 8)
            if segments != expected:
                raise ValueError(f"{segments} RLE segments where {expected} are expected")
            return
        else:
            return  # native (uncompressed) or deflated: the header's size is the data's
    except (ValueError, struct.error) as error:
        raise InputError(f"{path}: corrupt {name} pixel data ({error})") from None
    if found != (rows, columns, samples):
        raise InputError(
            f"{path}: its compressed pixel data hold a {found[0]} x {found[1]} x {found[2]} "
            f"frame where the header says {rows} x {columns} x {samples}; refused before "
            "decoding"
        )
