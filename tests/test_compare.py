"""python -m utils.inference.compare: one table of several runs' quality scores, and its refusal to set scores of
two feature networks side by side."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli
from utils.inference.compare import main as compare_main


def scores(fd: float, features: str, sampler: str | None = "prior") -> dict:
    entry = {"fd": fd, "kid_mean": 0.5, "kid_sd": 0.25, "precision": 0.8, "recall": 0.7, "density": 0.9,
             "coverage": 0.6, "c2st_accuracy": 0.75, "n_real": 10, "n_generated": 10, "features": features}
    return entry if sampler is None else {**entry, "sampler": sampler}


def write_run(folder: Path, **entries: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(entries))
    return folder


def test_a_table_of_runs_in_one_feature_space(tmp_path):
    a = write_run(tmp_path / "a", quality=scores(12.5, "mnist-classifier@aaaa"))
    b = write_run(tmp_path / "b", quality=scores(3.25, "mnist-classifier@aaaa", "gmm"),
                  recon_quality=scores(1.5, "mnist-classifier@aaaa", None))
    res = cli(compare_main, [str(a), str(b / "eval.json")])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "in the features of mnist-classifier@aaaa:"
    assert lines[4] == "| a (prior) | 12.5 | 0.5 ± 0.25 | 0.800 | 0.700 | 0.900 | 0.600 | 0.750 |"
    assert lines[5].startswith("| b (gmm) | 3.25 |")
    recon = cli(compare_main, [str(b), "--metric", "recon_quality"])
    assert recon.returncode == 0 and "| b | 1.5 |" in recon.stdout


def test_scores_of_two_feature_networks_are_refused(tmp_path):
    a = write_run(tmp_path / "a", quality=scores(12.5, "mnist-classifier@aaaa"))
    b = write_run(tmp_path / "b", quality=scores(3.0, "mnist-classifier@bbbb"))
    res = cli(compare_main, [str(a), str(b)])
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""
    assert "a (prior) was measured in mnist-classifier@aaaa and b (prior) in mnist-classifier@bbbb" in res.stderr
    missing = cli(compare_main, [str(a), str(tmp_path / "nowhere")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_entry = cli(compare_main, [str(a), "--metric", "recon_quality"])
    assert no_entry.returncode == 2 and "has no recon_quality scores" in no_entry.stderr
    (tmp_path / "bad.json").write_text("{not json")
    bad = cli(compare_main, [str(tmp_path / "bad.json")])
    assert bad.returncode == 2 and "is not an eval.json" in bad.stderr
