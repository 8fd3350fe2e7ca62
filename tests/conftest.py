"""Shared test helpers: the real data in ../shared/data and a runner for the real scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("VAE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()

# small, fast settings shared by the end-to-end runs: real MNIST, a few steps
FAST = ["data.root=" + str(DATA), "train.batch_size=32", "train.log_every=1", "train.eval_samples=256",
        "train.sample_every=0", "train.eval_every=0", "train.save_every=0"]


@pytest.fixture(scope="session", autouse=True)
def real_data() -> Path:
    """The tests use real MNIST; they fail, not skip, when it is missing."""
    raw = DATA / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert raw.is_file(), f"real MNIST expected at {raw} (set VAE_TEST_DATA to the folder holding MNIST/raw)"
    return DATA


def run_script(args: list[str], cwd: Path | None = None, launcher: list[str] | None = None,
               env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a top-level script of the repo as a user would, and return the finished process."""
    cmd = (launcher or [sys.executable]) + args
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def train(exp_dir: Path, config: str = "configs/mnist.yaml", extra: list[str] | None = None,
          **kw) -> subprocess.CompletedProcess:
    proc = run_script([str(REPO / "train_vae.py"), "-c", str(REPO / config), "-e", str(exp_dir), *FAST,
                       *(extra or [])], **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
