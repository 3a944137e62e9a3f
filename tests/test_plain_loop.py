"""The plain-loop baseline's time budget, read from the workflow's Snakemake benchmark files."""

from __future__ import annotations

import pytest

from bench.plain_loop import budget_from
from brainmri.errors import InputError

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_benchmark(path, wall: float, cpu: float):
    path.write_text(HEADER + f"{wall}\t0:00:01\t1\t1\t1\t1\t0\t0\t50\t{cpu}\n")
    return path


def test_budget_sums_the_chosen_clock_over_files(tmp_path):
    files = [
        write_benchmark(tmp_path / "unet_fold0.tsv", 100.0, 180.5),
        write_benchmark(tmp_path / "unet_fold1.tsv", 50.0, 90.0),
    ]
    assert budget_from(files, "cpu") == pytest.approx(270.5)
    assert budget_from(files, "wall") == pytest.approx(150.0)


def test_budget_refuses_a_file_that_is_not_a_benchmark(tmp_path):
    other = tmp_path / "history.csv"
    other.write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(InputError, match=r"history\.csv: not a Snakemake benchmark file"):
        budget_from([other], "cpu")
    with pytest.raises(InputError, match=r"missing\.tsv: cannot read it"):
        budget_from([tmp_path / "missing.tsv"], "cpu")
