"""Safe extraction of downloaded or user-supplied archives.

Refuses members whose path is absolute, contains ``..`` or resolves outside the destination,
symlink / device / other special members, and archives over the configured size, member or
compression-ratio caps (zip bombs; checked from the headers first and again while streaming,
in case they lie). The ratio is the archive's total uncompressed size over its size on disk:
the real Kaggle archives are about 2.6 (LGG, TIFFs) and 1.0 (JPGs); a zip bomb is 100 to
1,000+. Extraction goes to a temporary folder that is renamed only on success: a refused
archive, also one stopped half-way (an error, Ctrl-C or SIGTERM), leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from brainmri.errors import InputError
from brainmri.io import atomic_path, terminate_as_exit

CHUNK = 1 << 20


class UnsafeArchiveError(InputError):
    """An archive member that would escape the destination, or an archive over a cap."""


@dataclass(frozen=True)
class ExtractionLimits:
    """Caps from ``data.extraction``."""

    max_total_bytes: int = 5_000_000_000
    max_members: int = 100_000
    max_ratio: float = 50.0


def _check_member_name(archive: Path, name: str) -> PurePosixPath:
    pure = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or pure.is_absolute() or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in pure.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'")
    return pure


def _zip_members(archive: Path, handle: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, int]]:
    members = []
    for info in handle.infolist():
        _check_member_name(archive, info.filename)
        file_type = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "symlink" if file_type == stat.S_IFLNK else "special file"
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a {kind}")
        members.append((info, info.file_size))
    return members


def _tar_members(archive: Path, handle: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, int]]:
    members = []
    for info in handle.getmembers():
        _check_member_name(archive, info.name)
        if info.issym() or info.islnk():
            raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a link")
        if not (info.isfile() or info.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a special file")
        members.append((info, info.size))
    return members


def _byte_budget(archive: Path, limits: ExtractionLimits) -> tuple[int, str]:
    """The most bytes the archive may expand to, and the setting that sets it."""
    by_ratio = int(limits.max_ratio * archive.stat().st_size)
    if by_ratio < limits.max_total_bytes:
        return by_ratio, f"data.extraction.max_ratio ({limits.max_ratio:g} x the archive's size)"
    return limits.max_total_bytes, f"data.extraction.max_total_bytes ({limits.max_total_bytes})"


def _check_caps(archive: Path, sizes: list[tuple[str, int]], limits: ExtractionLimits) -> int:
    if len(sizes) > limits.max_members:
        raise UnsafeArchiveError(
            f"{archive}: {len(sizes)} members exceed data.extraction.max_members "
            f"({limits.max_members})"
        )
    total = 0
    for name, size in sizes:
        total += size
        if total > limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"{archive}: uncompressed size exceeds data.extraction.max_total_bytes "
                f"({limits.max_total_bytes}) at member {name!r}"
            )
    packed = archive.stat().st_size
    if total > limits.max_ratio * packed:
        raise UnsafeArchiveError(
            f"{archive}: declares {total} bytes uncompressed from {packed} on disk, a "
            f"compression ratio of {total / packed:.0f} over data.extraction.max_ratio "
            f"({limits.max_ratio:g}; a zip bomb?)"
        )
    return total


def _target(archive: Path, root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise UnsafeArchiveError(f"{archive}: member {name!r} resolves outside the destination")
    return target


def _copy_stream(
    archive: Path,
    name: str,
    source,
    target: Path,
    budget: list[int],
    cap: str = "data.extraction.max_total_bytes",
) -> None:
    """Copy one member, counting its bytes against ``budget`` (all members together)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while chunk := source.read(CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise UnsafeArchiveError(
                    f"{archive}: member {name!r} inflates beyond {cap}; nothing was kept"
                )
            out.write(chunk)


def extract_archive(
    archive: str | os.PathLike[str], destination: str | os.PathLike[str], limits: ExtractionLimits
) -> list[str]:
    """Extract ``archive`` (.zip, .tar, .tar.gz, .tgz) safely into ``destination``.

    Returns the extracted file names (relative, POSIX). ``destination`` appears (or replaces an
    older folder) only when everything was extracted; a refused archive leaves nothing.
    """
    archive = Path(archive)
    destination = Path(destination)
    if not archive.is_file():
        raise InputError(f"{archive}: archive not found")
    if archive.stat().st_size == 0:
        raise InputError(f"{archive}: archive is empty (0 bytes)")
    is_zip = zipfile.is_zipfile(archive)
    if not is_zip and not tarfile.is_tarfile(archive):
        raise InputError(f"{archive}: not a zip or tar archive")
    names: list[str] = []
    try:
        with terminate_as_exit(), atomic_path(destination) as tmp:
            tmp.mkdir()
            root = tmp.resolve()
            if is_zip:
                _extract_zip(archive, root, limits, names)
            else:
                _extract_tar(archive, root, limits, names)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        raise InputError(f"{archive}: corrupt archive ({error})") from None
    return sorted(names)


def _plan(
    archive: Path, root: Path, sizes: list[tuple[str, int]], limits: ExtractionLimits
) -> tuple[list[int], int]:
    """The checks on the declared sizes (caps, free disk) before a byte is written; returns the
    streamed byte budget (a one-element list the copies draw down) and its cap."""
    total = _check_caps(archive, sizes, limits)
    _check_disk(archive, root, total)
    allowed, cap = _byte_budget(archive, limits)
    return [allowed], cap


def _extract_zip(archive: Path, root: Path, limits: ExtractionLimits, names: list[str]) -> None:
    with zipfile.ZipFile(archive) as handle:
        members = _zip_members(archive, handle)
        budget, cap = _plan(archive, root, [(i.filename, s) for i, s in members], limits)
        for info, _ in members:
            target = _target(archive, root, info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with handle.open(info) as source:
                _copy_stream(archive, info.filename, source, target, budget, cap)
            names.append(PurePosixPath(info.filename).as_posix())


def _extract_tar(archive: Path, root: Path, limits: ExtractionLimits, names: list[str]) -> None:
    with tarfile.open(archive) as handle:
        members = _tar_members(archive, handle)
        budget, cap = _plan(archive, root, [(i.name, s) for i, s in members], limits)
        for info, _ in members:
            target = _target(archive, root, info.name)
            if info.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            source = handle.extractfile(info)
            if source is None:
                raise UnsafeArchiveError(f"{archive}: member {info.name!r} is unreadable")
            _copy_stream(archive, info.name, source, target, budget, cap)
            names.append(PurePosixPath(info.name).as_posix())


def _check_disk(archive: Path, root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if needed > free:
        raise InputError(
            f"{archive}: extraction needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB "
            f"are free at {root.parent}"
        )


def copy_tree(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> list[str]:
    """Copy an already-extracted folder (hard links where possible) into ``destination``.

    Symbolic links are followed only when they resolve inside ``source``; links that point
    outside it, and special files, are refused. Returns the copied file names (relative, POSIX).
    """
    source = Path(source)
    root = source.resolve()
    names: list[str] = []
    with terminate_as_exit(), atomic_path(destination) as tmp:
        tmp.mkdir()
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if path.is_symlink():
                resolved = path.resolve()
                if root not in resolved.parents:
                    raise UnsafeArchiveError(
                        f"{source}: {relative} is a symbolic link pointing outside the folder "
                        f"({resolved}); refusing it"
                    )
                if resolved.is_dir():
                    continue  # rglob does not descend into linked folders; skip them entirely
            target = tmp / relative
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not path.is_file():
                raise UnsafeArchiveError(f"{source}: {relative} is a special file; refusing it")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path.resolve(), target)
            except OSError:
                shutil.copy2(path, target)
            names.append(relative.as_posix())
    return names
