"""End-to-end runs of train_vae.py on real MNIST: run directory, resume, mixed precision, DDP.

The runs call the real command line in this process (``conftest.train``); only the two-process runs need
``accelerate launch``, and so a process of their own.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CPU, DATA, FAST, REPO, accel_2, run_script, train, train_cli
from utils.grids import save_grid, save_pairs
from utils.inference.loading import load_trained
from utils.training.run_folder import read_metrics

pytestmark = pytest.mark.slow  # short training runs end to end, and two processes

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


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def same_picture(written: Path, expected: torch.Tensor, write, tmp: Path) -> None:
    """``written`` shows ``expected`` as ``write`` lays it out: pixel for pixel, give or take one 8-bit level
    (the trainer's conv nets run channels-last, the reloaded model contiguous: the last float bits differ)."""
    write(expected, tmp)
    a, b = pixels(written), pixels(tmp)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def tensorboard_scalars(run: Path, tag: str) -> dict[int, float]:
    (events,) = {p.parent for p in (run / "tb").glob("events.out.tfevents.*")}  # (hyperparameters: below)
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_writes_the_run_directory(family, tmp_path, real_data):
    config, extra = FAMILIES[family]
    run = tmp_path / "run"
    train(run, config, ["train.steps=8", "train.sample_every=8", "train.eval_every=4", "train.save_every=4",
                        "model.base_width=8", *extra])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 8 and cfg["data"]["root"] == str(DATA)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line is JSON (read_metrics would skip a broken one)
    assert rows == read_metrics(run)
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
    # TensorBoard holds the same numbers as metrics.jsonl
    logged = tensorboard_scalars(run, "train/loss")
    assert sorted(logged) == list(range(1, 9))
    assert [logged[r["step"]] for r in train_rows] == pytest.approx([r["loss"] for r in train_rows], rel=1e-5)
    assert tensorboard_scalars(run, "test/elbo") == pytest.approx({r["step"]: r["elbo"] for r in tests}, rel=1e-5)
    weights = load_file(run / "model.safetensors")
    assert any(k.startswith("encoder.") for k in weights) and any(k.startswith("decoder.") for k in weights)
    assert ("likelihood.log_sigma" in weights) == (cfg["model"]["likelihood"] == "sigma")
    last = load_file(run / "checkpoints" / "step_0000008" / "model.safetensors")
    assert last.keys() == weights.keys() and all(torch.equal(last[k], weights[k]) for k in weights)
    # the grids show the final model: decoded fixed prior draws, and the first test images above their
    # reconstructions
    assert {p.name for p in (run / "samples").iterdir()} == {"step_0000008_samples.png", "step_0000008_recon.png"}
    _, model, _, _ = load_trained(str(run), None, None)
    with torch.no_grad():
        z = model.prior.sample(64, torch.Generator().manual_seed(cfg["train"]["seed"]))
        same_picture(run / "samples" / "step_0000008_samples.png", model.decode(z),
                     lambda x, p: save_grid(x, p, per_row=8), tmp_path / "samples.png")
        from utils.config import load_config
        from utils.data.registry import load_data

        x = load_data(load_config(run / "config.yaml").data)[1].batch(torch.arange(32))
        same_picture(run / "samples" / "step_0000008_recon.png", model.decode(model.encode(x)[0]),
                     lambda r, p: save_pairs(x, r, p), tmp_path / "recon.png")


def test_losses_fall_over_a_few_hundred_steps(mnist_300):
    rows = read_metrics(mnist_300, "train")
    assert [r["step"] for r in rows] == [50, 100, 150, 200, 250, 300]
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"]  # BCE falls from ~550 to well under 200 nats


def test_resume_equals_unbroken_run(tmp_path, real_data):
    extra = ["train.steps=12", "train.save_every=6", "train.eval_every=6", "train.sample_every=6",
             "model.net=conv", "model.base_width=8", "loss.regulariser=mmd", "loss.mmd_weight=10",
             "loss.kl_warmup_steps=5"]
    train(tmp_path / "full", extra=extra)
    train(tmp_path / "part", extra=extra[:-4] + ["train.steps=6"] + extra[-4:])
    res = train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=12"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout and "at step 6" in res.stdout
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in part] == [r["step"] for r in full]
    for a, b in zip(full, part):
        assert a["loss"] == b["loss"] and a["split"] == b["split"], (a, b)
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_is_not_overwritten(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "metrics.jsonl").read_text()
    res = train_cli(["-c", str(REPO / "configs/mnist.yaml"), "-e", str(run)])
    assert res.returncode == 2 and "already holds a run" in res.stderr and "-r latest" in res.stderr
    assert (run / "metrics.jsonl").read_text() == before


def test_bf16_autocast_on_cpu(tmp_path, real_data):
    res = train(tmp_path / "run", "configs/mnist_sigma_vae.yaml",
                ["train.steps=4", "train.mixed_precision=bf16", "model.base_width=8"])
    assert "precision=bf16" in res.stdout
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # and the next run in this process is in fp32 again: nothing of the bf16 run's Accelerate state is left
    fp32 = train(tmp_path / "fp32", "configs/mnist_sigma_vae.yaml", ["train.steps=1", "model.base_width=8"])
    assert "precision=no" in fp32.stdout




def test_ddp_two_processes_train_and_agree_on_optimal_sigma_and_the_critic(tmp_path, real_data):
    run = tmp_path / "ddp"
    proc = run_script([str(REPO / "train_vae.py"), "-c", str(REPO / "configs/mnist_optimal_sigma_vae.yaml"), "-e",
                       str(run), *FAST, "train.steps=6", "train.eval_every=6", "model.base_width=8"],
                      launcher=accel_2(), env=CPU)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes=2" in proc.stdout
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6] and all(math.isfinite(r["sigma"]) for r in rows)
    weights = load_file(run / "model.safetensors")
    _, one, _, _ = load_trained(str(run), None, None)  # the weights fit the config's model, and are finite
    assert weights.keys() == one.state_dict().keys() and all(v.isfinite().all() for v in weights.values())

    import ddp_optimal_sigma

    p = run_script([str(REPO / "tests" / "ddp_optimal_sigma.py"), str(DATA)], launcher=accel_2(), env=CPU)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "processes=2 " in p.stdout
    s2 = float(p.stdout.split("sigma=")[1].split()[0])
    s1 = ddp_optimal_sigma.optimal_sigma(str(DATA), 0, 1)  # one process holding the whole batch
    assert s1 == pytest.approx(s2, rel=1e-6)
    # and it is the σ of the whole batch, not of one process's half
    halves = [ddp_optimal_sigma.optimal_sigma(str(DATA), r, 2) for r in (0, 1)]
    assert all(abs(h - s1) > 1e-4 for h in halves)
    assert 0.3 < s1 < 0.7
    # FactorVAE's critic, trained outside the VAE's DDP wrapper, stays the same on both processes
    p = run_script([str(REPO / "tests" / "ddp_critic.py")], launcher=accel_2(), env=CPU)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "processes=2 same=True moved=True local_same=False" in p.stdout


def test_batch_not_divisible_by_processes(tmp_path, real_data):
    proc = run_script([str(REPO / "train_vae.py"), "-c", str(REPO / "configs/mnist.yaml"), "-e",
                       str(tmp_path / "r"), "data.root=" + str(DATA), "train.batch_size=33", "train.steps=1"],
                      launcher=accel_2(), env=CPU)
    assert proc.returncode != 0
    assert "train.batch_size=33 does not split into 2 processes x 1 micro-batches" in proc.stderr


def test_the_trainers_optimal_sigma_test_bound_is_evaluates(tmp_path, real_data, monkeypatch):
    """An optimal-σ model's logged test ELBO is evaluate.py's, on the same weights, seed, batch size and images:
    one σ for the whole test set (the RMSE of its posterior-mean reconstructions), not each batch's own, and the
    same draws. Each batch's own σ fits that batch: its bound looks better by nats per image."""
    from accelerate import Accelerator

    import evaluate
    from conftest import cli
    from utils.data.registry import load_data
    from utils.evaluation import bounds

    run = tmp_path / "run"
    train(run, "configs/mnist_optimal_sigma_vae.yaml", ["train.steps=30", "train.eval_samples=400", "train.seed=3"])
    logged = read_metrics(run, "test")[-1]
    out = tmp_path / "eval.json"
    res = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "elbo", "--n_test", "400", "--batch_size", "32",
                              "--seed", "3", "--out", str(out)])
    assert res.returncode == 0, res.stderr
    reported = json.loads(out.read_text())
    assert logged["elbo"] == pytest.approx(reported["elbo"]["elbo"], abs=1e-3)
    assert logged["sigma"] == pytest.approx(reported["sigma"], rel=1e-5)
    # each batch's own σ (no σ fixed for the test set), the optimum of each batch's own NLL on the same draws, is a
    # better-looking number (0.3 nats per image here, after 30 steps)
    cfg, vae, _, _ = load_trained(str(run), None, None)
    test_set = load_data(cfg.data)[1]
    monkeypatch.setattr(bounds, "fix_optimal_sigma", lambda *args, **kwargs: None)
    per_batch = bounds.elbo_terms(vae, test_set, 32, Accelerator(cpu=True), 400, 3)
    assert per_batch["elbo"] > logged["elbo"] + 0.1, (per_batch["elbo"], logged["elbo"])
