"""train_vae.py answers --help, argument and config errors before the heavy libraries load: torch
and the rest take seconds to import, and a typo in a flag or a config should not cost that wait. Read from the
interpreter's own import log (``python -X importtime``), in a fresh process each."""

from __future__ import annotations

import pytest

from conftest import run_script

HEAVY = {"torch", "torchvision", "accelerate", "sklearn", "matplotlib", "datasets"}


def imported(stderr: str) -> set[str]:
    """The top-level packages that ``-X importtime`` logged as imported."""
    return {line.split("|")[2].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2} - {"package"}


@pytest.mark.parametrize("args, rc, said", [
    (["--help"], 0, "usage: train_vae.py"),
    (["-c"], 2, "error: argument -c/--config: expected one argument"),
    (["-r", "latest", "--overwrite"], 2, "error: --overwrite starts a run afresh and -r continues one"),
    ([], 2, "error: no config given"),
])
def test_help_and_argument_errors_load_no_heavy_library(args, rc, said):
    res = run_script(["-X", "importtime", "train_vae.py", *args])
    assert res.returncode == rc and said in res.stdout + res.stderr, res.stderr[-2000:]
    logged = imported(res.stderr)
    assert "utils" in logged  # the log is read: the toolkit's own modules show in it
    assert not logged & HEAVY, sorted(logged & HEAVY)


@pytest.mark.parametrize("args, said", [
    (["-c", "configs/mnist.yaml", "loss.betta=3"], "unknown config key 'loss.betta'"),
    (["-c", "configs/mnist.yaml", "loss.regulariser=mmdd"], "expected one of kl, none, mmd"),
    (["-c", "configs/mnist.yaml", "train.lr=-1"], "train.lr"),
])
def test_a_config_key_error_loads_no_heavy_library(args, said):
    """A key or a value the schema refuses (an unknown key, a part no registry holds, a value out of range) is said
    before torch loads: the registries' names are read without importing their modules."""
    res = run_script(["-X", "importtime", "train_vae.py", *args])
    assert res.returncode == 2 and said in res.stderr, res.stderr[-2000:]
    logged = imported(res.stderr)
    assert "utils" in logged and not logged & HEAVY, sorted(logged & HEAVY)


@pytest.mark.parametrize("args, rc, said", [
    (["-c", "configs/mnist.yaml", "loss.regulariser=mmd"], 2, "error: loss.regulariser=mmd needs loss.mmd_weight > 0"),
    (["-c", "configs/mnist.yaml", "loss.objective=ae"], 2, "error: loss.objective=ae has no posterior variance"),
])
def test_rules_across_parts_load_no_heavy_library(args, rc, said):
    """A rule across parts asks the chosen parts' rules classes, which need no torch."""
    res = run_script(["-X", "importtime", "train_vae.py", *args])
    assert res.returncode == rc and said in res.stdout + res.stderr, res.stderr[-2000:]
    logged = imported(res.stderr)
    assert "utils" in logged and not logged & HEAVY, sorted(logged & HEAVY)
