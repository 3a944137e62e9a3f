"""Peak memory of reading one volume (docs/volumes.md#memory): for each repository given, the
growth of ``ru_maxrss`` over the imports while ``read_input`` reads a generated int16 ``.nii.gz``
patient, in a fresh process per input, so that two versions of the code compare on the same
files.

  python bench/volume_memory.py BEFORE_REPO .

Prints a Markdown table: input, stored MiB, then one column of MiB per repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

READ = """
import resource, sys
from pathlib import Path
from brainmri.data.limits import Limits
from brainmri.inference.volume_io import read_input
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
volume = read_input(Path(sys.argv[1]), "axial", Limits(max_bytes=1 << 31))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
SHAPE = (512, 512, 100)


def write_volume(path: Path, shape: tuple[int, ...], slope: float | None) -> int:
    """An int16 volume (zeros with a constant box) -> its stored bytes."""
    data = np.zeros(shape, dtype=np.int16)
    data[10:20, 10:20] = 7
    image = nib.Nifti1Image(data, np.eye(4))
    if slope is not None:
        image.header.set_slope_inter(slope, 3.0)
    nib.save(image, path)
    return data.nbytes


def inputs(root: Path) -> dict[str, tuple[Path, int]]:
    one, scaled, three = root / "one.nii.gz", root / "scaled.nii.gz", root / "three"
    three.mkdir()
    stored = sum(
        write_volume(three / f"case_{s}.nii.gz", SHAPE, None) for s in ("pre", "flair", "post")
    )
    return {
        "one 4-D file, 512 x 512 x 100 x 3": (one, write_volume(one, (*SHAPE, 3), None)),
        "the same with scl_slope set": (scaled, write_volume(scaled, (*SHAPE, 3), 1.5)),
        "three files, 512 x 512 x 100 each": (three, stored),
    }


def growth_mib(repo: str, path: Path, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(repo).resolve())}
    result = subprocess.run(
        [sys.executable, "-c", READ, str(path)], capture_output=True, text=True, env=env, cwd=cwd
    )
    return result.stdout.strip() if result.returncode == 0 else "error"


def main() -> None:
    repos = sys.argv[1:] or ["."]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        print("| input (int16, .nii.gz) | stored MiB | " + " | ".join(repos) + " |")
        print("| --- | ---: |" + " ---: |" * len(repos))
        for label, (path, stored) in inputs(root).items():
            cells = [growth_mib(repo, path, root) for repo in repos]
            print(f"| {label} | {stored / 2**20:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
