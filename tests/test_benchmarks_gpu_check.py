"""The GPU check script (benchmarks/gpu_check.py), run here on the CPU so that it works when a GPU is at hand:
its runs pass, a CPU resume is bit-exact by its own measure, and a failing run makes it fail."""

from __future__ import annotations

import json

import pytest

from conftest import DATA, run_script
from utils.inference.modes import MODES

pytestmark = pytest.mark.slow  # the GPU check, which trains each family


def test_gpu_check_passes_on_a_good_run_and_measures_the_resume(tmp_path, real_data):
    out = tmp_path / "check"
    proc = run_script(["benchmarks/gpu_check.py", "--data", str(DATA), "--families", "vae", "--precisions", "fp32",
                       "--inspect", "fp32", "--steps", "20", "--jobs", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [row] = json.loads((out / "check.json").read_text())["rows"]
    assert row["failures"] == [] and row["resume_gap"] == 0.0  # a CPU resume is bit-exact
    assert row["loss_last"] < row["loss_first"] and row["test_elbo"] < 0
    for mode in MODES:  # MNIST: every mode runs
        assert list((out / "vae-fp32" / mode).glob("*.png")), mode
    assert "| vae | fp32 |" in proc.stdout and "NaN batch under fp32: skipped" in proc.stdout


def test_gpu_check_fails_when_a_run_fails(tmp_path):
    proc = run_script(["benchmarks/gpu_check.py", "--data", str(tmp_path / "nothing"), "--families", "vae",
                       "--precisions", "fp32", "--steps", "20", "--jobs", "1", "--out", str(tmp_path / "check")])
    assert proc.returncode == 1
    [row] = json.loads((tmp_path / "check" / "check.json").read_text())["rows"]
    assert row["failures"][0].startswith("train: exit 2: error:")
