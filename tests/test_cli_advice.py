"""The advice sample.py and evaluate.py print can be followed there: the data layer's hints name the config keys of
a training run (data.root), which these two refuse as unknown arguments; they take --data_root."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

import evaluate
import sample
from conftest import DATA, cli
from utils.inference.loading import in_cli_terms


@pytest.fixture
def moved_run(tiny_run, tmp_path) -> Path:
    """A run whose data folder is gone, as on another machine (data.download=false: no network wait)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["root"] = str(tmp_path / "moved")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


@pytest.mark.parametrize(("main", "args"), [(sample.main, ["--mode", "reconstruct", "--n_samples", "8"]),
                                            (evaluate.main, ["--metrics", "recon", "--n_test", "50"])],
                         ids=["sample", "evaluate"])
def test_the_missing_data_hint_names_a_flag_that_works(main, args, moved_run):
    res = cli(main, ["--exp_dir", str(moved_run), *args])
    assert res.returncode == 2 and "data.root" not in res.stderr and "data.download" not in res.stderr, res.stderr
    assert "pass --data_root" in res.stderr, res.stderr
    flag = re.search(r"--data_root\b", res.stderr).group(0)
    followed = cli(main, ["--exp_dir", str(moved_run), *args, flag, str(DATA)])
    assert followed.returncode == 0, followed.stderr[-2000:]


def test_the_config_terms_become_the_flags():
    assert in_cli_terms("MNIST not found in d/MNIST/raw: put the official files in d/MNIST/raw, or point data.root "
                        "at a folder that holds them, or set data.download=true (needs internet) [x]") == \
        ("MNIST not found in d/MNIST/raw: put the official files in d/MNIST/raw, or pass --data_root a folder that "
         "holds them [x]")
    assert in_cli_terms("data.root=/x is not a folder: point it at a folder") == \
        "--data_root /x is not a folder: point it at a folder"
    assert in_cli_terms("loss.beta: got -1") == "loss.beta: got -1"
