"""Safe extraction: malicious archives are refused and leave nothing behind."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

import pytest

from brainmri.archives import ExtractionLimits, UnsafeArchiveError, extract_archive
from helpers import run_script


def make_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return path


REGULAR = stat.S_IFREG | 0o644


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("ok.txt", b"x", REGULAR), ("../../x", b"evil", REGULAR)], "'..'"),
        ([("/abs/x", b"evil", REGULAR)], "absolute"),
        ([("link", b"/etc/passwd", stat.S_IFLNK | 0o777)], "symlink"),
        ([("fifo", b"", stat.S_IFIFO | 0o644)], "special"),
    ],
)
def test_malicious_zip_members_are_refused(tmp_path, members, message):
    archive = make_zip(tmp_path / "evil.zip", members)
    destination = tmp_path / "out" / "dest"
    with pytest.raises(UnsafeArchiveError, match=message) as error:
        extract_archive(archive, destination, ExtractionLimits())
    assert "evil.zip" in str(error.value)
    assert not destination.exists()
    assert not list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else True
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()


def test_zip_bomb_over_the_cap_is_refused_before_writing(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", [("a.bin", b"\0" * 5_000_000, REGULAR)])
    assert archive.stat().st_size < 100_000
    destination = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match="max_total_bytes"):
        extract_archive(archive, destination, ExtractionLimits(max_total_bytes=1_000_000))
    assert not destination.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.zip"]


def test_too_many_members_is_refused(tmp_path):
    members = [(f"f{i}.txt", b"x", REGULAR) for i in range(20)]
    archive = make_zip(tmp_path / "many.zip", members)
    with pytest.raises(UnsafeArchiveError, match="max_members"):
        extract_archive(archive, tmp_path / "dest", ExtractionLimits(max_members=10))
    assert not (tmp_path / "dest").exists()


def test_tar_symlink_and_traversal_are_refused(tmp_path):
    for name, kind in (("../x", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)):
        path = tmp_path / f"{kind!r}.tar"
        with tarfile.open(path, "w") as archive:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            info.size = 0
            archive.addfile(info, io.BytesIO(b""))
        with pytest.raises(UnsafeArchiveError):
            extract_archive(path, tmp_path / "dest", ExtractionLimits())
        assert not (tmp_path / "dest").exists()


def test_fetch_script_refuses_a_malicious_local_archive_and_writes_nothing(tmp_path):
    local = tmp_path / "archives"
    local.mkdir()
    make_zip(local / "lgg-mri-segmentation.zip", [("kaggle_3m/../../../escape.txt", b"x", REGULAR)])
    out = tmp_path / "results" / "raw" / "lgg-mri-segmentation"
    result = run_script("fetch_dataset.py", "--dataset", "lgg-mri-segmentation", "--source", "local",
                        f"--local-dir={local}", "--out-dir", out, "--checksums", tmp_path / "c.tsv")
    assert result.returncode == 1
    assert "lgg-mri-segmentation.zip" in result.stderr and "escape.txt" in result.stderr
    assert not out.exists() and not (tmp_path / "c.tsv").exists()
    assert not list(tmp_path.rglob("escape.txt"))
