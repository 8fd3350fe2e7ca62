"""End-to-end runs of train_vae.py on real MNIST: run directory, resume, mixed precision, DDP."""

from __future__ import annotations

import json
import math
import re
import socket
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import DATA, REPO, run_script, train
from utils.run import read_metrics

FAMILIES = {
    "bernoulli-mlp": ("configs/mnist.yaml", []),
    "beta-warmup-conv": ("configs/mnist_beta_vae.yaml", ["loss.kl_warmup_steps=4"]),
    "mmd": ("configs/mnist_mmd_vae.yaml", []),
    "mmd-rbf": ("configs/mnist_mmd_vae.yaml", ["loss.mmd_kernel=rbf", "model.net=conv"]),
    "gaussian": ("configs/mnist_gaussian_vae.yaml", []),
    "mse": ("configs/mnist_mse_vae.yaml", []),
    "sigma": ("configs/mnist_sigma_vae.yaml", []),
    "optimal_sigma": ("configs/mnist_optimal_sigma_vae.yaml", []),
    "per_pixel_sigma": ("configs/mnist_sigma_vae.yaml", ["model.likelihood=per_pixel_sigma"]),
    "fashion": ("configs/fashion_mnist.yaml", []),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_writes_the_run_directory(family, tmp_path):
    config, extra = FAMILIES[family]
    run = tmp_path / "run"
    train(run, config, ["train.steps=8", "train.sample_every=8", "train.eval_every=4", "train.save_every=4",
                        "model.base_width=8", *extra])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 8 and cfg["data"]["root"] == str(DATA)
    rows = read_metrics(run)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    for r in rows:
        assert {"step", "split", "loss", "rec", "kl"} <= set(r) and all(math.isfinite(v) for v in r.values()
                                                                          if isinstance(v, float))
    assert ("sigma" in train_rows[0]) == (cfg["model"]["likelihood"] not in ("bernoulli",))
    assert ("mmd" in train_rows[0]) == (cfg["loss"]["mmd_weight"] > 0)
    assert train_rows[0]["kl_weight"] == pytest.approx(
        0.0 if cfg["loss"]["kl_warmup_steps"] else cfg["loss"]["beta"])
    tests = [r for r in rows if r["split"] == "test"]
    assert [r["step"] for r in tests] == [4, 8] and {"elbo", "bpd", "nll"} <= set(tests[0])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]
    assert {p.name for p in (run / "samples").iterdir()} == {"step_0000008_samples.png", "step_0000008_recon.png"}
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    weights = load_file(run / "model.safetensors")
    assert any(k.startswith("encoder.") for k in weights) and any(k.startswith("decoder.") for k in weights)
    assert ("likelihood.log_sigma" in weights) == (cfg["model"]["likelihood"] == "sigma")


def test_losses_fall_over_a_few_hundred_steps(tmp_path):
    train(tmp_path / "run", extra=["train.steps=300", "train.log_every=50", "train.batch_size=64"])
    rows = read_metrics(tmp_path / "run", "train")
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"]  # BCE falls from ~550 to well under 200 nats


def test_resume_equals_unbroken_run(tmp_path):
    extra = ["train.steps=12", "train.save_every=6", "train.eval_every=6", "train.sample_every=6",
             "model.net=conv", "model.base_width=8", "loss.regulariser=mmd", "loss.mmd_weight=10",
             "loss.kl_warmup_steps=5"]
    train(tmp_path / "full", extra=extra)
    train(tmp_path / "part", extra=extra[:-4] + ["train.steps=6"] + extra[-4:])
    proc = run_script([str(REPO / "train_vae.py"), "-r", "latest", "-e", str(tmp_path / "part"), "train.steps=12"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in part] == [r["step"] for r in full]
    for a, b in zip(full, part):
        assert a["loss"] == b["loss"] and a["split"] == b["split"], (a, b)
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_is_not_overwritten(tmp_path):
    train(tmp_path / "run", extra=["train.steps=2"])
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    proc = run_script([str(REPO / "train_vae.py"), "-c", str(REPO / "configs/mnist.yaml"), "-e",
                       str(tmp_path / "run")])
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "-r latest" in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_bf16_autocast_on_cpu(tmp_path):
    proc = train(tmp_path / "run", "configs/mnist_sigma_vae.yaml",
                 ["train.steps=4", "train.mixed_precision=bf16", "model.base_width=8"])
    assert "precision=bf16" in proc.stdout
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))


def accel_2() -> list[str]:
    """A two-process CPU launch on its own free port, so no other job's rendezvous (default 29500) can collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


CPU = {"ACCELERATE_USE_CPU": "1"}


def test_ddp_two_processes_train_and_agree_on_optimal_sigma(tmp_path):
    run = tmp_path / "ddp"
    proc = train(run, "configs/mnist_optimal_sigma_vae.yaml", ["train.steps=6", "train.eval_every=6",
                                                                "model.base_width=8"], launcher=accel_2(), env=CPU)
    assert "processes=2" in proc.stdout
    assert (run / "model.safetensors").is_file() and all(math.isfinite(r["sigma"]) for r in read_metrics(run))

    def sigma(launcher: list[str]) -> float:
        p = run_script([str(REPO / "tests" / "ddp_optimal_sigma.py"), str(DATA)], launcher=launcher, env=CPU)
        assert p.returncode == 0, p.stderr[-2000:]
        return float(re.search(r"sigma=(\S+)", p.stdout).group(1))

    one = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    s1, s2 = sigma(one), sigma(accel_2())
    assert s1 == pytest.approx(s2, rel=1e-6)
    # and it is the σ of the whole batch, not of one process's half
    assert 0.3 < s1 < 0.7


def test_batch_not_divisible_by_processes(tmp_path):
    proc = run_script([str(REPO / "train_vae.py"), "-c", str(REPO / "configs/mnist.yaml"), "-e",
                       str(tmp_path / "r"), "data.root=" + str(DATA), "train.batch_size=33", "train.steps=1"],
                      launcher=accel_2(), env=CPU)
    assert proc.returncode != 0
    assert "train.batch_size=33 is not divisible by the 2 processes" in proc.stderr


def test_metrics_lines_are_json(tmp_path):
    train(tmp_path / "run", extra=["train.steps=3"])
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_missing_data_leaves_no_run_behind(tmp_path):
    cmd = [str(REPO / "train_vae.py"), "-c", str(REPO / "configs/mnist.yaml"), "-e", str(tmp_path / "run"),
           f"data.root={tmp_path / 'nowhere'}", "data.download=false"]
    proc = run_script(cmd)
    assert proc.returncode == 2 and "MNIST not found in" in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # so the same command works once the data is there
