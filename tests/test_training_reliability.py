"""Reliability, end to end on real MNIST: killed, interrupted, diverging and starved runs lose nothing.

Training runs as a real subprocess where the process itself is the point: it is signalled,
SIGKILLed, or has its file-size limit lowered while it runs. Resuming, and the runs that only
inspect or resume checkpoints, call the real command line in this process (conftest.train_cli).
The checks are against an unbroken run of the same config and seed (bit-identical weights on
CPU), or against the files already on disk.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import utils.training.loop
from conftest import DATA, FAST, REPO, THREADS, run_script, train, train_cli
from utils.training.checkpoints import checkpoints, problem, write_manifest
from utils.training.run_folder import read_metrics

pytestmark = pytest.mark.slow  # training runs killed, signalled and resumed, in processes

TRAIN = str(REPO / "train_vae.py")
MNIST = str(REPO / "configs" / "mnist.yaml")


def launch(args: list[str], out: Path, launcher: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start a script as a user would, in its own process group, output to files (no pipe can fill up)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS), **(env or {})}
    return subprocess.Popen((launcher or [sys.executable]) + args, cwd=REPO, env=full_env, start_new_session=True,
                            stdout=open(out.with_suffix(".out"), "w"), stderr=open(out.with_suffix(".err"), "w"))


def wait_until(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.time() < end, "timed out"
        time.sleep(0.02)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def resume(run: Path, *overrides: str):
    """``python train_vae.py -r latest -e RUN OVERRIDES``, in this process; it must succeed."""
    res = train_cli(["-r", "latest", "-e", str(run), *overrides])
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_sigkill_after_a_checkpoint_then_resume_equals_unbroken_run(tmp_path, real_data):
    extra = ["train.steps=400", "train.save_every=100", "train.log_every=50", "train.keep_checkpoints=2"]
    killed = tmp_path / "killed"
    proc = launch([TRAIN, "-c", MNIST, "-e", str(killed), *FAST, *extra], tmp_path / "k")
    wait_until(lambda: bool(checkpoints(killed)), proc)
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed or cleaned up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "model.safetensors").exists()
    assert "resumed from" in resume(killed).stdout
    train(tmp_path / "unbroken", extra=extra)
    assert same_weights(killed, tmp_path / "unbroken")
    assert [r["loss"] for r in read_metrics(killed)] == [r["loss"] for r in read_metrics(tmp_path / "unbroken")]
    # keep_checkpoints=2: only the newest two remain, and nothing half-written or half-deleted
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_0000300", "step_0000400"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_continues_exactly(sig, tmp_path, real_data):
    run = tmp_path / "run"
    proc = launch([TRAIN, "-c", MNIST, "-e", str(run), *FAST, "train.steps=100000", "train.log_every=10"],
                  tmp_path / "t")
    wait_until(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 5, proc)
    os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C or a scheduler does
    assert proc.wait(timeout=60) == 128 + sig
    err = (tmp_path / "t.err").read_text().strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"{signal.Signals(sig).name} at step ") and "resume with" in err[-1]
    (ckpt,) = checkpoints(run)
    step = int(ckpt.name.split("_")[1])
    assert problem(ckpt) is None and step >= 50 and f"saved {ckpt}" in err[-1]
    total = f"train.steps={step + 30}"
    assert f"at step {step}" in resume(run, total).stdout
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert steps[-1] == step + 30 and steps == sorted(set(steps))  # the log goes on where the checkpoint was
    if sig == signal.SIGTERM:  # and the interrupted + resumed run is the unbroken one
        train(tmp_path / "unbroken", extra=["train.log_every=10", total])
        assert same_weights(run, tmp_path / "unbroken")


@pytest.fixture(scope="module")
def unbroken_40(tmp_path_factory) -> Path:
    """The unbroken run that the resumed runs below must equal: 40 steps, a checkpoint every 10."""
    run = tmp_path_factory.mktemp("unbroken") / "run"
    train(run, extra=["train.steps=40", "train.save_every=10"])
    return run


def test_latest_skips_incomplete_and_damaged_checkpoints(tmp_path, unbroken_40):
    run = tmp_path / "run"
    extra = ["train.steps=30", "train.save_every=10", "train.keep_checkpoints=0"]
    train(run, extra=extra)
    c10, c20, c30 = checkpoints(run)
    # a run killed between writing a checkpoint and renaming it leaves step_N.tmp
    shutil.copytree(c20, run / "checkpoints" / "step_0000040.tmp")
    data = bytearray((c30 / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    (c30 / "model.safetensors").write_bytes(bytes(data))
    truncated = tmp_path / "step_0000010"
    shutil.copytree(c10, truncated)
    with open(truncated / "optimizer.bin", "r+b") as f:
        f.truncate(100)
    assert "damaged" in problem(c30) and "truncated" in problem(truncated) and problem(c20) is None

    res = resume(run, "train.steps=40")
    assert f"skipping incomplete checkpoint {run / 'checkpoints' / 'step_0000040.tmp'}" in res.stderr
    assert f"skipping checkpoint {c30}: model.safetensors is damaged" in res.stderr
    assert f"resumed from {c20} at step 20" in res.stdout
    assert f"the later checkpoint step_0000030 is set aside as {c30}.superseded" in res.stderr
    assert [c.name for c in checkpoints(run)] == ["step_0000010", "step_0000020", "step_0000030", "step_0000040"]
    assert problem(checkpoints(run)[2]) is None  # written anew by the resumed run
    assert same_weights(run, unbroken_40)

    named = train_cli(["-r", str(truncated)])
    assert named.returncode == 2 and named.stderr.strip().splitlines() == [
        f"error: checkpoint {truncated} cannot be resumed: optimizer.bin is truncated or changed (100 bytes, "
        f"expected {(c10 / 'optimizer.bin').stat().st_size}); use -r latest to take the newest good one"]


def test_resume_is_exact_even_when_accelerate_cannot_restore_the_rng(tmp_path, unbroken_40):
    """Accelerate only logs a failure to read its RNG pickle; the toolkit's own rng_R.safetensors keeps resume exact."""
    part = tmp_path / "part"
    train(part, extra=["train.steps=10", "train.save_every=10"])
    (ckpt,) = checkpoints(part)
    (ckpt / "random_states_0.pkl").unlink()
    write_manifest(ckpt, 10)
    resume(part, "train.steps=40", "train.save_every=10")
    assert same_weights(part, unbroken_40)


class RunsCode:
    """Unpickling this calls exec: what a hostile checkpoint would hide in its optimizer state."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_crafted_pickle_in_a_checkpoint_is_refused_without_running(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (ckpt,) = checkpoints(run)
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": RunsCode(marker)}, ckpt / "optimizer.bin")
    write_manifest(ckpt, 2)  # a consistent manifest: the file looks like a good checkpoint
    res = train_cli(["-r", str(ckpt), "train.steps=4"])
    assert res.returncode == 2 and not marker.exists()
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"error: refused to load {ckpt}: a pickle in it holds more than tensors") and "exec" in line
    torch.load(ckpt / "optimizer.bin", weights_only=False)  # the control: an unsafe load really runs it
    assert marker.read_text() == "ran"


def test_fid_weights_that_would_run_code_are_refused(tmp_path):
    from utils.errors import UserError
    from utils.evaluation.fid import build_fid

    marker = tmp_path / "pwned"
    torch.save({"conv.weight": torch.zeros(1), "x": RunsCode(marker)}, tmp_path / "inception.pth")
    with pytest.raises(UserError, match="refused to load --fid_weights .*holds more than tensors"):
        build_fid(str(tmp_path / "inception.pth"))
    assert not marker.exists()


def test_shape_mismatch_on_resume_lists_the_tensors(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = (run / "config.yaml").read_text()
    res = train_cli(["-r", "latest", "-e", str(run), "model.z_dim=8", "train.steps=4"])
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "does not fit the model of this config" in line and "encoder.net.3.weight (32, 400) vs (16, 400)" in line
    assert "resume without overriding model.*" in line and problem(checkpoints(run)[-1]) is None
    assert (run / "config.yaml").read_text() == config  # the run still describes its weights


def test_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, real_data):
    run = tmp_path / "run"
    train(run, "configs/mnist_sigma_vae.yaml", ["train.steps=20", "train.save_every=10"])
    good = load_file(checkpoints(run)[-1] / "model.safetensors")
    res = train_cli(["-r", "latest", "-e", str(run), "train.steps=200", "train.lr=1000", "train.max_bad_steps=5"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith("error: training diverged at step ") and "5 steps in a row had a non-finite loss" in line
    assert f"the last good checkpoint {run / 'checkpoints' / 'step_0000020'} is kept" in line
    assert "lower train.lr (now 1000)" in line and "train.mixed_precision=no" in line
    assert [c.name for c in checkpoints(run)] == ["step_0000010", "step_0000020"]
    assert all(torch.equal(good[k], v) for k, v in load_file(checkpoints(run)[-1] / "model.safetensors").items())
    assert read_metrics(run, "train")[-1]["bad_steps"] >= 1
    resume(run, "train.steps=30", "train.lr=1e-3")  # as advised
    assert read_metrics(run, "train")[-1]["step"] == 30 and (run / "model.safetensors").is_file()


def test_nan_step_is_skipped_on_the_device():
    """A NaN batch leaves weights, Adam's moments and step count, and batch-norm statistics as they were."""
    from accelerate import Accelerator

    from models.vae import VAE
    from utils.config import load_config
    from utils.training.optim import StepGuard, grad_norm, make_optimizer

    cfg = load_config(MNIST, ["model.net=conv", "model.base_width=4"])
    torch.manual_seed(0)
    vae = VAE(cfg.model, cfg.loss, (1, 28, 28), cfg.train.batch_size)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(vae, make_optimizer(vae.parameters(), cfg.train))
    guard = StepGuard(vae, acc.device)
    x = torch.rand(8, 1, 28, 28)

    def step(batch: torch.Tensor) -> float:
        guard.before_forward()
        loss = model(batch, 0)["loss"]
        acc.backward(loss)
        bad = guard.check(loss, grad_norm(model.parameters()), acc)
        guard.skip_if(opt, bad, acc.scaler)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(bad)

    assert step(x) == 0.0
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    adam = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    assert step(poisoned) == 1.0 and step(poisoned) == 1.0
    after = vae.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k]) and "num_batches" not in k]
    assert changed == []  # weights and running mean/var untouched
    assert all(torch.equal(adam[k], v) for k, v in opt.state_dict()["state"][0].items())  # step count too
    assert (guard.total.item(), guard.streak.item(), guard.worst.item()) == (2, 2, 2)
    assert step(x) == 0.0
    assert not torch.equal(before["decoder.fc.weight"], vae.state_dict()["decoder.fc.weight"])
    assert (guard.total.item(), guard.streak.item(), guard.worst.item()) == (2, 0, 2)


def test_full_disk_during_a_checkpoint_leaves_the_last_one_intact(tmp_path, real_data):
    run = tmp_path / "run"
    proc = launch([TRAIN, "-c", MNIST, "-e", str(run), *FAST, "train.steps=100000", "train.save_every=100",
                   "train.log_every=50", "train.keep_checkpoints=0"], tmp_path / "t")
    wait_until(lambda: bool(checkpoints(run)), proc)
    # writes larger than 1 MB now fail (EFBIG), as on a full disk; the weights file alone is 2.6 MB
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    assert proc.wait(timeout=120) == 2
    line = (tmp_path / "t.err").read_text().strip().splitlines()[-1]
    good = checkpoints(run)
    assert line.startswith("error: could not write checkpoint ") and "raise the file-size limit" in line
    assert "free disk space" not in line  # the advice fits the cause: a file-size limit, not a full disk
    assert f"the last complete checkpoint {good[-1]} is intact" in line
    assert all(problem(c) is None for c in good)
    assert not list((run / "checkpoints").glob("*.tmp"))
    last = int(good[-1].name[5:])
    assert f"at step {last}" in resume(run, f"train.steps={last + 10}").stdout


def test_failing_final_weights_write_is_one_line_and_resume_finishes_it(tmp_path, real_data):
    run = tmp_path / "run"
    proc = launch([TRAIN, "-c", MNIST, "-e", str(run), *FAST, "train.steps=400", "train.log_every=50"],
                  tmp_path / "t")
    wait_until(lambda: (run / "config.yaml").is_file(), proc)
    (run / "model.safetensors.tmp").mkdir()  # the write of the final weights will fail (a directory is in the way)
    assert proc.wait(timeout=120) == 2
    line = (tmp_path / "t.err").read_text().strip().splitlines()[-1]
    assert line.startswith(f"error: could not write {run / 'model.safetensors'} (") and "-r latest" in line
    assert not (run / "model.safetensors").exists() and problem(checkpoints(run)[-1]) is None
    (run / "model.safetensors.tmp").rmdir()
    resume(run)
    final, ckpt = load_file(run / "model.safetensors"), load_file(checkpoints(run)[-1] / "model.safetensors")
    assert checkpoints(run)[-1].name == "step_0000400"
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def test_data_root_vanishing_mid_run_is_a_clear_error(tmp_path, monkeypatch, real_data):
    from utils.config import DataConfig
    from utils.data.registry import load_data

    images = load_data(DataConfig(root=str(DATA)))[1].images[:64]
    root = tmp_path / "imgs"
    root.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(root / f"{i:03d}.png")
    run = tmp_path / "run"
    args = ["-c", MNIST, "-e", str(run), *FAST, "data.name=image_folder", f"data.root={root}",
            "data.channels=1", "data.img_size=28", "data.num_workers=2", "data.test_fraction=0.1",
            "train.steps=100000", "train.save_every=20", "train.log_every=20"]
    save = utils.training.loop.save_checkpoint

    def save_then_move(*a, **kw):  # the folder goes away right after the first checkpoint, while workers read it
        out = save(*a, **kw)
        if root.exists():
            root.rename(tmp_path / "moved")
        return out

    monkeypatch.setattr(utils.training.loop, "save_checkpoint", save_then_move)
    res = train_cli(args)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: image ") and "has vanished" in line and "-r latest" in line
    assert [c.name for c in checkpoints(run)] == ["step_0000020"] and problem(checkpoints(run)[0]) is None
    monkeypatch.undo()
    (tmp_path / "moved").rename(root)
    assert "at step 20" in resume(run, "train.steps=25").stdout
    assert read_metrics(run, "train")[-1]["step"] == 25


def test_overwrite_replaces_a_run_only_when_asked_and_only_once_the_new_one_can_start(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    old = (run / "metrics.jsonl").read_text()
    failing = train_cli(["-c", MNIST, "-e", str(run), "--overwrite", f"data.root={tmp_path}/none",
                         "data.download=false"])
    assert failing.returncode == 2 and "MNIST not found in" in failing.stderr
    assert (run / "metrics.jsonl").read_text() == old  # bad start: old run untouched
    res = train(run, extra=["train.steps=3", "--overwrite"])
    assert "--overwrite: replacing the run" in res.stdout
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3]
    assert [c.name for c in checkpoints(run)] == ["step_0000003"]  # nothing of the old run is left


def test_two_processes_agree_on_the_step_to_save_when_signalled(tmp_path, real_data):
    from conftest import CPU, accel_2

    run = tmp_path / "ddp"
    proc = launch([TRAIN, "-c", MNIST, "-e", str(run), *FAST, "train.steps=100000", "train.log_every=10"],
                  tmp_path / "t", launcher=accel_2(), env=CPU)
    wait_until(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # launcher and both processes, as a scheduler does
    proc.wait(timeout=60)  # the launcher's own exit status and traceback are torch.distributed's
    err = (tmp_path / "t.err").read_text()
    (ckpt,) = checkpoints(run)
    step = int(ckpt.name[5:])
    assert err.count(f"SIGTERM at step {step}: saved {ckpt}") == 2  # both processes, the same step
    assert problem(ckpt) is None and {"rng_0.safetensors", "rng_1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    resumed = run_script([TRAIN, "-r", "latest", "-e", str(run), f"train.steps={step + 10}"], launcher=accel_2(),
                         env=CPU)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-2000:]
    assert "processes=2" in resumed.stdout and read_metrics(run, "train")[-1]["step"] == step + 10
