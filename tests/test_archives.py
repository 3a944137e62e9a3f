"""Safe extraction: hostile archives are refused and leave nothing inside or outside the target."""

from __future__ import annotations

import io
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from brainmri.data import archives
from brainmri.data.archives import ExtractionLimits, UnsafeArchiveError, copy_tree, extract_archive
from brainmri.errors import InputError

REPO = Path(__file__).resolve().parents[1]
REGULAR = stat.S_IFREG | 0o644
LIMITS = ExtractionLimits(max_total_bytes=10_000_000, max_members=100)


def make_zip(path: Path, members: list[tuple[str, bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def snapshot(root: Path) -> list[str]:
    """Every path under root (files and folders), to compare before and after."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_refused(tmp_path: Path, archive: Path, *fragments: str, limits=LIMITS) -> None:
    before = [p for p in snapshot(tmp_path) if p != "work"]
    destination = tmp_path / "work" / "out"
    with pytest.raises(UnsafeArchiveError) as caught:
        extract_archive(archive, destination, limits)
    message = str(caught.value)
    assert str(archive) in message
    for fragment in fragments:
        assert fragment in message
    # Nothing inside the destination (it does not exist) and nothing outside it; the parent
    # folder created for the temporary is empty.
    after = [p for p in snapshot(tmp_path) if p != "work"]
    assert after == before
    assert not destination.exists()


@pytest.mark.parametrize(
    ("name", "mode", "fragment"),
    [
        ("../../x", REGULAR, "'../../x' contains '..'"),
        ("good/../../../x", REGULAR, "contains '..'"),
        ("/tmp/brainmri-absolute-x", REGULAR, "absolute path"),
        ("C:/windows/x", REGULAR, "absolute path"),
        ("link", stat.S_IFLNK | 0o777, "'link' is a symlink"),
        ("fifo", stat.S_IFIFO | 0o644, "'fifo' is a special file"),
        ("dev", stat.S_IFCHR | 0o644, "'dev' is a special file"),
    ],
)
def test_hostile_zip_members_are_refused(tmp_path, name, mode, fragment):
    # A harmless member first: it must not be left behind either.
    archive = make_zip(
        tmp_path / "evil.zip", [("ok.txt", b"fine", REGULAR), (name, b"../etc", mode)]
    )
    assert_refused(tmp_path, archive, fragment)
    assert not Path("/tmp/brainmri-absolute-x").exists()


def test_zip_bomb_over_the_byte_cap_is_refused_from_the_headers(tmp_path, monkeypatch):
    # 20 MB of zeros compress to ~20 kB: over the 10 MB cap.
    archive = make_zip(tmp_path / "bomb.zip", [("zeros.bin", b"\0" * 20_000_000, REGULAR)])
    assert archive.stat().st_size < 100_000
    writes = []
    monkeypatch.setattr(archives, "_copy_stream", lambda *a: writes.append(a))
    assert_refused(tmp_path, archive, "max_total_bytes", "'zeros.bin'")
    assert writes == []  # refused before anything was written


def test_zip_with_a_lying_size_header_is_refused(tmp_path):
    archive = make_zip(tmp_path / "liar.zip", [("zeros.bin", b"\0" * 5_000_000, REGULAR)])
    data = bytearray(archive.read_bytes())
    # Declare 10 bytes uncompressed in the central directory and the local header.
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 10)
    struct.pack_into("<I", data, 22, 10)
    archive.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"liar\.zip"):
        extract_archive(archive, tmp_path / "work" / "out", ExtractionLimits(1000, 10))
    assert [p for p in snapshot(tmp_path) if p != "work"] == before


def test_streaming_cap_stops_a_member_that_inflates_beyond_its_header(tmp_path):
    # Defence in depth behind the header check: bytes are counted while they are written.
    stream = io.BytesIO(b"\0" * (3 << 20))
    with pytest.raises(UnsafeArchiveError, match=r"'m\.bin' inflates beyond"):
        archives._copy_stream(Path("a.zip"), "m.bin", stream, tmp_path / "m.bin", [1 << 20])
    assert (tmp_path / "m.bin").stat().st_size <= 1 << 20


def test_too_many_members_is_refused(tmp_path):
    members = [(f"f{i}.txt", b"x", REGULAR) for i in range(12)]
    archive = make_zip(tmp_path / "many.zip", members)
    assert_refused(
        tmp_path, archive, "12 members", "max_members", limits=ExtractionLimits(10**6, 10)
    )


def test_tar_traversal_links_and_devices_are_refused(tmp_path):
    def info(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
        member = tarfile.TarInfo(name)
        member.type, member.linkname, member.size = (
            kind,
            target,
            4 if kind == tarfile.REGTYPE else 0,
        )
        return member

    cases = [
        ([info("../x")], "contains '..'"),
        ([info("/abs")], "absolute path"),
        ([info("s", tarfile.SYMTYPE, "/etc/passwd")], "'s' is a link"),
        ([info("h", tarfile.LNKTYPE, "../../etc/passwd")], "'h' is a link"),
        ([info("d", tarfile.CHRTYPE)], "'d' is a special file"),
    ]
    for i, (members, fragment) in enumerate(cases):
        archive = make_tar(tmp_path / f"evil{i}.tar.gz", [info("ok.txt"), *members], b"data")
        assert_refused(tmp_path, archive, fragment)


def test_member_resolving_outside_through_a_symlinked_folder_is_refused(tmp_path, monkeypatch):
    # A folder member that is a symlink on disk (planted by an earlier member, here simulated
    # by resolving through an existing link) must not let a later member escape.
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(UnsafeArchiveError, match="resolves outside"):
        archives._target(Path("a.zip"), root.resolve(), "sub/file.txt")


def test_valid_zip_and_tar_extract_completely(tmp_path):
    members = [("kaggle_3m/a.txt", b"alpha", REGULAR), ("kaggle_3m/b/c.txt", b"gamma", REGULAR)]
    archive = make_zip(tmp_path / "good.zip", [("kaggle_3m/", b"", stat.S_IFDIR | 0o755), *members])
    names = extract_archive(archive, tmp_path / "out", LIMITS)
    assert names == ["kaggle_3m/a.txt", "kaggle_3m/b/c.txt"]
    assert (tmp_path / "out" / "kaggle_3m" / "b" / "c.txt").read_bytes() == b"gamma"

    tar_member = tarfile.TarInfo("x/y.txt")
    tar_member.size = 4
    tar = make_tar(tmp_path / "good.tar.gz", [tar_member], b"data")
    assert extract_archive(tar, tmp_path / "out2", LIMITS) == ["x/y.txt"]
    assert (tmp_path / "out2" / "x" / "y.txt").read_bytes() == b"data"


def test_a_refused_archive_keeps_the_previous_extraction(tmp_path):
    good = make_zip(tmp_path / "good.zip", [("a.txt", b"old", REGULAR)])
    extract_archive(good, tmp_path / "out", LIMITS)
    evil = make_zip(tmp_path / "evil.zip", [("a.txt", b"new", REGULAR), ("../b", b"", REGULAR)])
    with pytest.raises(UnsafeArchiveError):
        extract_archive(evil, tmp_path / "out", LIMITS)
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip", "good.zip", "out"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "archive is empty (0 bytes)"), (b"hello, not an archive", "not a zip or tar archive")],
)
def test_empty_and_non_archives_are_input_errors(tmp_path, content, fragment):
    path = tmp_path / "lgg-mri-segmentation.zip"
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(f"{path}: {fragment}")):
        extract_archive(path, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_corrupt_zip_is_an_input_error_naming_the_archive(tmp_path):
    archive = make_zip(tmp_path / "c.zip", [("a.bin", os.urandom(4000), REGULAR)])
    data = bytearray(archive.read_bytes())
    data[100:200] = bytes(100)  # inside the compressed data of a.bin
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"c\.zip: corrupt archive"):
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "big.zip", [("a.bin", os.urandom(100_000), REGULAR)])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    with pytest.raises(InputError, match=r"big\.zip: extraction needs"):
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.zip"]


def test_copy_tree_follows_inner_links_and_refuses_links_outside(tmp_path):
    source = tmp_path / "src"
    (source / "d").mkdir(parents=True)
    (source / "d" / "a.txt").write_text("a")
    (source / "inner").symlink_to(source / "d" / "a.txt")
    names = copy_tree(source, tmp_path / "copy")
    assert sorted(names) == ["d/a.txt", "inner"]
    assert (tmp_path / "copy" / "inner").read_text() == "a"
    assert not (tmp_path / "copy" / "inner").is_symlink()

    (tmp_path / "secret.txt").write_text("secret")
    (source / "escape").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(UnsafeArchiveError, match="escape is a symbolic link pointing outside"):
        copy_tree(source, tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists()


def fetch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "workflow_scripts" / "fetch_dataset.py"),
        "--dataset=lgg-mri-segmentation",
        "--synthetic={}",
        '--extraction={"max_total_bytes": 1000000, "max_members": 100}',
        f"--out-dir={tmp_path / 'raw' / 'lgg-mri-segmentation'}",
        f"--checksums={tmp_path / 'raw' / 'lgg.tsv'}",
        *args,
    ]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_fetch_local_refuses_a_malicious_archive_and_writes_nothing(tmp_path):
    local = tmp_path / "downloads"
    local.mkdir()
    make_zip(
        local / "lgg-mri-segmentation.zip", [("a.txt", b"", REGULAR), ("../../x", b"", REGULAR)]
    )
    result = fetch(tmp_path, "--source=local", f"--local-dir={local}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error (UnsafeArchiveError):")
    assert "lgg-mri-segmentation.zip" in lines[-1] and "'../../x'" in lines[-1]
    assert not (tmp_path / "raw" / "lgg-mri-segmentation").exists()
    assert not (tmp_path / "raw" / "lgg.tsv").exists()
    assert not (tmp_path / "x").exists()


def test_fetch_local_uses_the_zip_or_the_extracted_folder_or_names_both(tmp_path):
    local = tmp_path / "downloads"
    (local / "lgg-mri-segmentation" / "kaggle_3m").mkdir(parents=True)
    (local / "lgg-mri-segmentation" / "kaggle_3m" / "f.txt").write_text("folder")
    result = fetch(tmp_path, "--source=local", f"--local-dir={local}")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "raw" / "lgg-mri-segmentation"
    assert (out / "kaggle_3m" / "f.txt").read_text() == "folder"
    assert "lgg-mri-segmentation/kaggle_3m/f.txt\t6\t" in (tmp_path / "raw" / "lgg.tsv").read_text()

    make_zip(local / "lgg-mri-segmentation.zip", [("kaggle_3m/z.txt", b"zipped", REGULAR)])
    result = fetch(tmp_path, "--source=local", f"--local-dir={local}")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "kaggle_3m").iterdir()) == ["z.txt"]  # the zip wins
    assert (
        (tmp_path / "raw" / "lgg.tsv")
        .read_text()
        .splitlines()[1]
        .startswith("lgg-mri-segmentation.zip\t")
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    result = fetch(tmp_path, "--source=local", f"--local-dir={empty}")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert str(empty / "lgg-mri-segmentation.zip") in message
    assert str(empty / "lgg-mri-segmentation") + "/" in message


# --- compression ratio (zip bombs that stay under the size cap) ----------------------------


def zip_bomb(path: Path, megabytes: int, members: int = 1) -> Path:
    """``members`` files of zeros, ``megabytes`` MB each: ~1,000x smaller on disk."""
    zeros = b"\0" * (megabytes << 20)
    return make_zip(path, [(f"zeros{i}.bin", zeros, REGULAR) for i in range(members)])


def test_default_caps_fit_the_real_archives_with_a_margin():
    limits = ExtractionLimits()
    # The full LGG archive, duplicate tree included, expands to about 1.5 GB.
    assert 3 * 1_500_000_000 <= limits.max_total_bytes <= 10_000_000_000
    sample = REPO.parent / "shared" / "data" / "kaggle-mini"
    for name, ratio in (("lgg-mri-segmentation.zip", 2.6), ("brain-tumor-mri-dataset.zip", 1.0)):
        if (sample / name).is_file():
            with zipfile.ZipFile(sample / name) as handle:
                total = sum(i.file_size for i in handle.infolist())
            assert total / (sample / name).stat().st_size == pytest.approx(ratio, abs=0.1)
        assert limits.max_ratio >= 10 * ratio


def test_zip_bomb_under_the_size_cap_is_refused_by_its_declared_ratio(tmp_path):
    archive = zip_bomb(tmp_path / "bomb.zip", 40, members=2)  # 80 MB from ~80 KB
    assert archive.stat().st_size < 200_000
    limits = ExtractionLimits()  # the defaults: 80 MB is far below max_total_bytes
    assert_refused(
        tmp_path, archive, "compression ratio of", "data.extraction.max_ratio", limits=limits
    )


def test_zip_bomb_with_lying_headers_leaves_nothing(tmp_path):
    archive = zip_bomb(tmp_path / "liar.zip", 40)
    data = bytearray(archive.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 1000)  # declares 1,000 bytes uncompressed
    struct.pack_into("<I", data, 22, 1000)
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"liar\.zip"):
        extract_archive(archive, tmp_path / "work" / "out", ExtractionLimits())
    assert list((tmp_path / "work").iterdir()) == []


def test_streamed_ratio_stops_a_bomb_whose_headers_were_believed(tmp_path, monkeypatch):
    # Skip the header check, as if the headers had lied: the bytes counted while streaming
    # stop the extraction at max_ratio x the archive's size, and the partial output is removed.
    archive = zip_bomb(tmp_path / "bomb.zip", 20, members=3)
    monkeypatch.setattr(archives, "_check_caps", lambda archive, sizes, limits: 0)
    with pytest.raises(
        UnsafeArchiveError, match=r"bomb\.zip: member 'zeros\d\.bin' inflates beyond data\."
        r"extraction\.max_ratio \(50 x the archive's size\); nothing was kept"
    ):  # fmt: skip
        extract_archive(archive, tmp_path / "work" / "out", ExtractionLimits())
    assert list((tmp_path / "work").iterdir()) == []


def test_tar_gz_bomb_is_refused_by_its_ratio(tmp_path):
    member = tarfile.TarInfo("zeros.bin")
    member.size = 30 << 20
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        handle.addfile(member, io.BytesIO(b"\0" * member.size))
    assert_refused(tmp_path, archive, "compression ratio of", limits=ExtractionLimits())


def test_an_archive_within_the_ratio_is_extracted(tmp_path):
    payload = os.urandom(200_000) + b"\0" * 200_000  # ratio about 2, like the LGG archive
    archive = make_zip(tmp_path / "ok.zip", [("a/b.bin", payload, REGULAR)])
    names = extract_archive(archive, tmp_path / "out", ExtractionLimits(max_ratio=3))
    assert names == ["a/b.bin"] and (tmp_path / "out" / "a" / "b.bin").read_bytes() == payload


# The extraction in a child process: after its first member it marks that it is under way and
# waits, so that the SIGTERM lands half-way through the archive every time.
INTERRUPTED = """
import sys, time
from pathlib import Path
from brainmri.data import archives
copy, marker = archives._copy_stream, Path(sys.argv[3])
def paced(*args, **kwargs):
    copy(*args, **kwargs)
    marker.touch()
    time.sleep(60)
archives._copy_stream = paced
archives.extract_archive(sys.argv[1], sys.argv[2], archives.ExtractionLimits(10**8, 100))
"""


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_sigterm_during_extraction_leaves_nothing(tmp_path, kind):
    """A SLURM time limit or `kill` half-way through: exit status 143, no raw/.<name>.*.tmp."""
    payload = [(f"kaggle_3m/p/s{i}.tif", os.urandom(200_000)) for i in range(20)]
    if kind == "zip":
        archive = make_zip(tmp_path / "a.zip", [(n, d, REGULAR) for n, d in payload])
    else:
        archive = tmp_path / "a.tar.gz"
        with tarfile.open(archive, "w:gz") as handle:
            for name, data in payload:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                handle.addfile(info, io.BytesIO(data))
    raw, marker = tmp_path / "raw", tmp_path / "started"
    raw.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED, archive, raw / "lgg-mri-segmentation", marker],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # the child's start and first member: well under a minute
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), child.stderr.read() if child.poll() is not None else "no start"
        # Half-way: the temporary folder holds the first member.
        assert [p.name.startswith(".lgg-mri-segmentation.") for p in raw.iterdir()] == [True]
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143, child.stderr.read()
    finally:
        child.kill()
    assert list(raw.iterdir()) == []
