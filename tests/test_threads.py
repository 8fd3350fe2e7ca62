"""CPU threads: the OpenMP wait policy is set before torch loads unless the user chose one, the thread count is
the user's (train.threads, --threads) and is shown on the run line, and a bad count is one line."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import FAST, REPO, cli, run_script, train_cli

PROBE = "import utils.threads, os, torch; print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())"


def probe(env: dict[str, str]) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**clean, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, check=True).stdout.split()


def test_passive_wait_is_the_default_and_a_users_policy_is_kept():
    assert probe({})[0] == "PASSIVE"
    assert probe({"OMP_WAIT_POLICY": "active"})[0] == "active"
    assert probe({"GOMP_SPINCOUNT": "1000"})[0] == "None"  # a spin count is a policy too: left alone


def test_too_late_once_torch_is_loaded():
    code = "import torch, os, utils.threads as t; print(os.environ.get('OMP_WAIT_POLICY'), t.passive_wait())"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "False"]


def test_run_line_shows_the_count_and_policy(tmp_path, real_data):
    res = run_script(["train_vae.py", "-c", "configs/mnist.yaml", "-e", str(tmp_path / "run"), *FAST,
                      "train.steps=2", "train.threads=2", "model.hidden=32"],
                     env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    users = any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    assert ("threads=2 (" if users else "threads=2 (passive wait)") in res.stdout, res.stdout
    res = run_script(["train_vae.py", "-c", "configs/mnist.yaml", "-e", str(tmp_path / "run1"), *FAST,
                      "train.steps=2", "model.hidden=32"], env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "threads=1 (" in res.stdout  # 0: OMP_NUM_THREADS decides


def test_bad_thread_counts_are_one_line(tmp_path):
    import evaluate
    import sample

    res = train_cli(["-c", str(REPO / "configs/mnist.yaml"), "-e", str(tmp_path / "r"), "train.threads=-1"])
    assert res.returncode == 2 and "train.threads" in res.stderr and not (tmp_path / "r").exists()
    for main in (sample.main, evaluate.main):
        res = cli(main, ["--threads", "-3"])
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--threads" in res.stderr, res.stderr
