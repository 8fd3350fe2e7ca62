"""Every entry point that writes, where writing fails: a read-only run folder, a file-size limit (as a full disk
does), names and files that are not UTF-8, a second trainer in a run, an export stopped half-way. Each ends in
success or one line with exit 2, before the work where it can be said before, with nothing half-written left
under the target's name and nothing computed lost; eval.json gathers the metrics of several calls."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import evaluate
import sample
import utils.files
from conftest import CPU, FAST, REPO, THREADS, cli, train_cli
from models.sampler_rules import SAMPLERS, SamplerOptions
from utils.errors import UserError
from utils.evaluation.metrics import merge_results
from utils.evaluation.samplers import keep
from utils.inference import export as exporter
from utils.inference.trained import TrainedVAE
from utils.training.run_folder import create_run_dir, read_metrics

pytestmark = pytest.mark.slow  # training, sampling and exports under file-size limits, in processes

MNIST = str(REPO / "configs" / "mnist.yaml")


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` refuses new files while the block runs, for root too: root ignores permission bits, so it is
    made immutable (chattr +i) when this process is root, and 0555 otherwise."""
    root = os.geteuid() == 0
    if root:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot make a folder read-only for root here: {done.stderr.strip()}")
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(mode)


def limited(args: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    """A script run in a new process whose files cannot grow past ``max_bytes`` (RLIMIT_FSIZE; Python ignores
    SIGXFSZ, so a write past it fails with EFBIG, as on a full disk)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS), **CPU}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)


def one_line(stderr: str) -> str:
    """The one line of a refusal, after any progress bar (the work it stopped)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture
def run(mnist_300, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(mnist_300, copy)
    return copy


# ---- eval.json gathers the metrics of several calls -----------------------------------------------------------

def test_eval_json_keeps_the_metrics_of_earlier_calls(run, tmp_path):
    first = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "elbo,nll", "--k", "5", "--n_test", "100"])
    assert first.returncode == 0, first.stderr[-2000:]
    before = json.loads((run / "eval.json").read_text())
    second = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "au", "--n_test", "50"])
    assert second.returncode == 0 and "(with the earlier elbo, nll)" in second.stdout, second.stderr[-2000:]
    now = json.loads((run / "eval.json").read_text())
    assert now["metrics"] == ["elbo", "nll", "au"]
    assert now["nll"] == before["nll"] and now["elbo"] == before["elbo"] and now["sigma"] == before["sigma"]
    assert now["computed_with"] == {"elbo": {"n_test": 100, "seed": 0, "binarize": False},
                                    "nll": {"k": 5, "n_test": 100, "seed": 0, "binarize": False},
                                    "au": {"n_test": 50, "seed": 0}}
    assert "NLL" not in second.stdout  # the table printed is this call's
    third = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "nll", "--k", "10", "--n_test", "100"])
    assert third.returncode == 0, third.stderr[-2000:]
    last = json.loads((run / "eval.json").read_text())
    assert last["nll"]["k"] == 10 and last["computed_with"]["nll"]["k"] == 10 and last["au"] == now["au"]
    # the card shows every kept metric
    assert cli(exporter.main, [str(run), str(tmp_path / "hub")]).returncode == 0
    card = ModelCard.load(tmp_path / "hub" / "README.md").text
    assert f"{last['nll']['nll']:.2f} nats" in card and f"| active units | {last['au']['active_units']} of 8 |" in card


def test_numbers_of_other_weights_are_not_kept():
    sha = {"file": "model.safetensors", "sha256": "a" * 64}
    earlier = {"weights": sha, "metrics": ["elbo", "au"], "elbo": {"elbo": -100.0}, "au": {"active_units": 3}}
    now = {"weights": sha, "metrics": ["au"], "au": {"active_units": 4}}
    merged, kept = merge_results(earlier, now)
    assert kept == ["elbo"] and merged["elbo"] == {"elbo": -100.0} and merged["au"] == {"active_units": 4}
    other = {**now, "weights": {"file": "model.safetensors", "sha256": "b" * 64}}
    assert merge_results(earlier, other) == (other, [])


def test_the_card_has_no_empty_table(run):
    vae = TrainedVAE.load(run)
    vae._card = {"eval": {"metrics": ["samplers"], "samplers": {"prior": {"held_out": -1.0, "reverse": -2.0}}}}
    assert "Held-out numbers" not in str(vae.generate_model_card())
    vae._card = {"eval": {"metrics": ["au"], "au": {"active_units": 3, "z_dim": 8}}}
    assert "| active units | 3 of 8 |" in str(vae.generate_model_card())


# ---- read-only run folders -------------------------------------------------------------------------------------

def test_a_read_only_run_is_said_before_evaluating_and_out_writes_elsewhere(run, tmp_path):
    with read_only(run):
        res = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "elbo", "--n_test", "100"])
        line = one_line(res.stderr)
        assert res.returncode == 2 and line.startswith(f"error: cannot write {run / 'eval.json'} (")
        assert "--out FILE" in line and res.stdout == ""  # said before anything was read or computed
        out = tmp_path / "elsewhere" / "eval.json"
        res = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "elbo", "--n_test", "100", "--out", str(out)])
        assert res.returncode == 0 and "elbo" in json.loads(out.read_text()), res.stderr[-2000:]
        assert not (run / "eval.json").exists()


def test_a_read_only_run_keeps_its_fitted_sampler_under_save_dir(run, tmp_path):
    args = ["--exp_dir", str(run), "--sampler", "gmm", "--gmm_components", "2", "--n_samples", "4"]
    with read_only(run):
        res = cli(sample.main, args)
        assert res.returncode == 2 and "--save_dir DIR" in one_line(res.stderr)
        res = cli(sample.main, [*args, "--save_dir", str(tmp_path / "s")])
        assert res.returncode == 0, res.stderr[-2000:]
        kept = tmp_path / "s" / "samplers" / "gmm.safetensors"
        first, fitted = (tmp_path / "s" / "samples_gmm.png").read_bytes(), kept.stat().st_mtime_ns
        res = cli(sample.main, [*args, "--save_dir", str(tmp_path / "s")])  # the kept fit is found there again
        assert res.returncode == 0 and kept.stat().st_mtime_ns == fitted
        assert (tmp_path / "s" / "samples_gmm.png").read_bytes() == first
    assert not (run / "samplers").exists() and not (run / "sample").exists()


def test_training_into_a_read_only_folder_is_refused_before_loading(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with read_only(run), read_only(tmp_path):
        res = train_cli(["-c", MNIST, "-e", str(tmp_path / "new"), "data.root=/nowhere", "data.download=false"])
        assert res.returncode == 2 and f"cannot write into {tmp_path / 'new'}" in one_line(res.stderr)
        res = train_cli(["-r", "latest", "-e", str(run), "data.root=/nowhere"])
        assert res.returncode == 2 and f"cannot write into {run}" in one_line(res.stderr)  # not "MNIST not found"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- file-size limits and full disks ---------------------------------------------------------------------------

def test_a_file_size_limit_while_sampling_is_one_line_and_leaves_no_torn_file(run, tmp_path):
    out = tmp_path / "s"
    res = limited(["sample.py", "--exp_dir", str(run), "--save_dir", str(out), "--n_samples", "64"], 2000)
    line = one_line(res.stderr)
    assert res.returncode == 2 and line.startswith("error: could not write ") and "ulimit -f" in line
    assert list(out.iterdir()) == []  # no samples.png cut short, no temporary
    # the sampler's own file: a fit that cannot be kept is one line too, and leaves nothing
    res = limited(["sample.py", "--exp_dir", str(run), "--save_dir", str(out), "--sampler", "gmm"], 1000)
    line = one_line(res.stderr)
    assert res.returncode == 2 and line.startswith(f"error: could not write {run / 'samplers' / 'gmm.safetensors'}")
    assert "ulimit -f" in line and list((run / "samplers").iterdir()) == []


def test_a_file_size_limit_writing_eval_json_keeps_the_numbers_on_screen(run):
    res = limited(["evaluate.py", "--exp_dir", str(run), "--metrics", "elbo", "--n_test", "100"], 100)
    line = one_line(res.stderr)
    assert res.returncode == 2 and line.startswith(f"error: could not write {run / 'eval.json'}")
    assert "ulimit -f" in line and "printed above" in line and res.stdout.count("ELBO") == 1
    assert not (run / "eval.json").exists() and not (run / "eval.json.tmp").exists()


def test_a_full_disk_is_told_apart_from_a_file_size_limit(run, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.files, "write_json", full)  # evaluate.py imports it where it writes
    res = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "elbo", "--n_test", "100"])
    line = one_line(res.stderr)
    assert res.returncode == 2 and "(No space left on device): free disk space where" in line
    assert "ulimit" not in line and "ELBO" in res.stdout


def test_a_fit_that_cannot_be_kept_is_used_and_said(tmp_path, capsys):
    folder = tmp_path / "samplers"
    folder.mkdir()
    sampler = SAMPLERS["gmm"].load()().fit(torch.randn(200, 2), SamplerOptions(gmm_components=2))
    with read_only(folder):
        keep(sampler, folder / "gmm.safetensors", {"gmm_components": "2"})
    assert "the fitted sampler is used but not kept" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_a_file_size_limit_during_export_leaves_no_folder_and_a_rerun_works(run, tmp_path):
    out = tmp_path / "hub"
    res = limited(["-m", "utils.inference.export", str(run), str(out)], 100_000)  # the weights are larger
    line = one_line(res.stderr)
    assert res.returncode == 2 and line.startswith(f"error: could not write {out} (") and "ulimit -f" in line
    assert list(tmp_path.iterdir()) == [run]  # no target, no folder built aside
    assert cli(exporter.main, [str(run), str(out)]).returncode == 0 and (out / "model.safetensors").is_file()


def test_an_export_that_fails_half_way_leaves_the_target_as_it_was(run, tmp_path, monkeypatch):
    out = tmp_path / "hub"
    out.mkdir()

    def broken(*args, **kwargs):
        raise RuntimeError("stopped half-way")

    monkeypatch.setattr(TrainedVAE, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="stopped half-way"):
        exporter.export(run, out)
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["hub", "run"]
    monkeypatch.undo()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = out.with_name(f"hub.{socket.gethostname()}.{dead.pid}.tmp")
    (killed / "samplers").mkdir(parents=True)  # what an export killed half-way leaves: removed by the next one
    assert cli(exporter.main, [str(run), str(out)]).returncode == 0 and (out / "README.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "run"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")  # an empty folder given through a link: filled, link kept
    assert cli(exporter.main, [str(run), str(tmp_path / "link")]).returncode == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "empty" / "model.safetensors").is_file()


# ---- files and names that are not UTF-8 ------------------------------------------------------------------------

def test_damaged_command_txt_and_eval_json_do_not_half_write_an_export(run, tmp_path):
    (run / "command.txt").write_bytes(b"python train_vae.py -e runs/caf\xe9\n")  # Latin-1, not UTF-8
    (run / "eval.json").write_text('{"metrics": ["elbo"], "elbo": {"elbo": -9')  # cut short
    res = cli(exporter.main, [str(run), str(tmp_path / "hub")])
    assert res.returncode == 2 and f"{run / 'eval.json'} is damaged" in one_line(res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (run / "eval.json").unlink()
    res = cli(exporter.main, [str(run), str(tmp_path / "hub")])
    assert res.returncode == 0, res.stderr
    assert "`python train_vae.py -e runs/caf\ufffd`" in (tmp_path / "hub" / "README.md").read_text()


def test_a_run_folder_whose_name_is_not_utf8_is_refused_before_anything_is_written(tiny_run, tmp_path):
    name = Path(os.fsdecode(bytes(tmp_path) + b"/run\xff"))
    res = train_cli(["-c", MNIST, "-e", str(name), "train.steps=2"])
    assert res.returncode == 2 and "run\\xff is not valid UTF-8: choose another -e" in one_line(res.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing that would block a rerun
    shutil.copytree(tiny_run, name)  # one made elsewhere: resuming it is refused the same way, untouched
    before = sorted(str(p) for p in name.rglob("*"))
    res = train_cli(["-r", "latest", "-e", str(name), "train.steps=3"])
    assert res.returncode == 2 and "rename the folder" in one_line(res.stderr)
    assert sorted(str(p) for p in name.rglob("*")) == before


# ---- one trainer per run ---------------------------------------------------------------------------------------

def test_a_second_trainer_in_a_run_is_refused_and_a_killed_one_leaves_no_lock(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS)}
    first = subprocess.Popen([sys.executable, str(REPO / "train_vae.py"), "-r", "latest", "-e", str(run),
                              "train.steps=100000", "train.log_every=10", "train.save_every=0"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.err", "w"))
    try:
        for _ in range(600):  # until it trains
            if len(read_metrics(run, "train")) > 2 or first.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert first.poll() is None, (tmp_path / "first.err").read_text()[-2000:]
        res = train_cli(["-r", "latest", "-e", str(run), "train.steps=5"])
        line = one_line(res.stderr)
        assert res.returncode == 2 and f"{run} is in use: process {first.pid} is training in it" in line
        res = train_cli(["-c", MNIST, "-e", str(run), "--overwrite", *FAST, "train.steps=5"])  # nor replaced
        assert res.returncode == 2 and f"{run} is in use: process {first.pid}" in res.stderr.splitlines()[-1]
        assert first.poll() is None and (run / "config.yaml").is_file()
    finally:
        first.send_signal(signal.SIGKILL)  # no handler runs: the operating system lets go of the lock
        first.wait()
    assert (run / "command.txt").read_text().count("# resumed") == 1
    res = train_cli(["-r", "latest", "-e", str(run), "train.steps=5", "train.log_every=1"])
    assert res.returncode == 0 and "at step 2" in res.stdout, res.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert steps == [1, 2, 3, 4, 5] and not (run / "train.lock").exists()


def test_a_run_started_in_the_folder_while_this_one_loaded_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("theirs")  # written by another start after this one checked the folder
    with pytest.raises(UserError, match="already holds a run, started while this one loaded"):
        create_run_dir(run, "ours", overwrite=False, command="python train_vae.py")
    assert (run / "config.yaml").read_text() == "theirs" and sorted(p.name for p in run.iterdir()) == ["config.yaml"]
