"""Gradient accumulation: a step run as micro-batches is the step on the whole batch, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU, FAST, REPO, accel_2, run_script, train, train_cli

pytestmark = pytest.mark.slow  # training runs, under two processes too

COMMON = ["model.hidden=32", "train.batch_size=64", "train.steps=6", "train.log_every=1", "train.lr=3e-3"]


def losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_micro_batches_make_the_same_steps(tmp_path, real_data):
    """Two micro-batches of 32 draw the same noise and sum to the same gradient as one batch of 64 (a plain ELBO
    with an MLP: no term couples the images of a batch), so six steps end at the same weights up to the order
    of float sums; the logged loss is the batch's mean either way."""
    train(tmp_path / "one", extra=COMMON)
    train(tmp_path / "two", extra=[*COMMON, "train.grad_accum_steps=2"])
    a, b = (load_file(tmp_path / r / "model.safetensors") for r in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # really run another way: sums in another order
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-4)
    # and not the same as a batch of 32: the second micro-batch is not dropped
    train(tmp_path / "half", extra=[*COMMON, "train.batch_size=32"])
    half = load_file(tmp_path / "half" / "model.safetensors")
    assert (half["decoder.net.0.weight"] - a["decoder.net.0.weight"]).abs().max() > 1e-3


def test_micro_batches_under_two_processes(tmp_path, real_data):
    """Under DDP only the last micro-batch's backward all-reduces (no_sync before it): two processes accumulating
    two micro-batches of 16 end at the weights of two processes stepping on 32 each, up to float-sum order; a
    missing all-reduce would leave each process on its own gradients, far off."""
    for name, extra in (("ddp", []), ("ddp_accum", ["train.grad_accum_steps=2"])):
        proc = run_script(["train_vae.py", "-c", str(REPO / "configs/mnist.yaml"), "-e", str(tmp_path / name),
                           *FAST, *COMMON, *extra], launcher=accel_2(), env=CPU)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (load_file(tmp_path / r / "model.safetensors") for r in ("ddp", "ddp_accum"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_accumulating_run_resumes_bit_for_bit(tmp_path, real_data):
    common = [*COMMON, "train.grad_accum_steps=4", "train.save_every=3", "train.keep_checkpoints=0"]
    train(tmp_path / "full", extra=common)
    train(tmp_path / "part", extra=[*common, "train.steps=3"])
    res = train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=6"])
    assert res.returncode == 0 and "at step 3" in res.stdout, res.stderr[-2000:]
    full, part = (load_file(tmp_path / r / "model.safetensors") for r in ("full", "part"))
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_batch_that_does_not_split(tmp_path, real_data):
    res = train_cli(["-c", str(REPO / "configs/mnist.yaml"), "-e", str(tmp_path / "r"), "train.batch_size=30",
                     "train.grad_accum_steps=4", "data.root=" + str(real_data)])
    assert res.returncode == 2 and "does not split into 1 processes x 4 micro-batches" in res.stderr
    assert not (tmp_path / "r").exists()
    res = train_cli(["-c", str(REPO / "configs/dsprites_factor_vae.yaml"), "-e", str(tmp_path / "f"),
                     "train.grad_accum_steps=2"])
    assert res.returncode == 2 and "does not accumulate" in res.stderr
