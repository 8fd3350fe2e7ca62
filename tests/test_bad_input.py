"""Bad input and damaged files, each planted here: the entry points answer in one line that names the problem and
the fix, derived files are rebuilt, and what the toolkit writes is readable and says only what is true."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample
import train_vae
from conftest import DATA, FAST, REPO, cli, require_data, train, train_cli
from utils.config import load_config
from utils.data.registry import load_data
from utils.errors import UserError
from utils.files import disk_advice, private_temporary, remove_stale_temporaries
from utils.inference import TrainedVAE
from utils.inference import export as exporter
from utils.inference import trained as trained_module
from utils.training.checkpoints import after_failed_write
from utils.training.config import native_cpu_bf16

MNIST = str(REPO / "configs" / "mnist.yaml")


# ---- the Python API and the exporter on bad paths -------------------------------------------------------------

@pytest.mark.parametrize("path, says", [
    ("/nonexistent/run", "not found"), ("./missing-run", "not found"), ("a/b/c", "not found"),
    ("README.md", "is a file, not a folder"), ("docs", "has neither config.yaml"),
    ("no such thing", "neither an existing folder nor a Hub repo id")])
def test_the_api_reads_a_local_looking_path_as_local(path, says, monkeypatch):
    """None of these reaches the Hub: a download attempt fails the test."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(TrainedVAE, "_load_hub", classmethod(lambda cls, p: pytest.fail(f"{p} tried on the Hub")))
    if says.startswith("neither"):
        monkeypatch.undo()
        monkeypatch.chdir(REPO)
    with pytest.raises(UserError, match=says):
        TrainedVAE.load(path)


def test_an_offline_machine_is_told_at_once(monkeypatch):
    monkeypatch.setattr(trained_module, "hub_reachable", lambda: False)
    calls = []
    monkeypatch.setattr(TrainedVAE, "from_pretrained",
                        classmethod(lambda cls, rid, **kw: calls.append(kw) or (_ for _ in ()).throw(OSError("x"))))
    with pytest.raises(UserError, match="cannot be reached"):
        TrainedVAE.load("someone/model")
    assert calls == [{"local_files_only": True}]  # only the local cache is asked


def test_export_into_a_file_is_refused(tiny_run, tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    res = cli(exporter.main, [str(tiny_run), str(target)])
    assert res.returncode == 2 and res.stderr == f"error: {target} is a file: export into a new or empty folder\n"
    assert target.read_text() == "mine"


# ---- damaged files -------------------------------------------------------------------------------------------

def test_a_config_that_is_not_text_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00model:\x00\x80")
    res = train_cli(["-c", str(bad), "-e", str(tmp_path / "r")])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "is not UTF-8 text" in res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("download", [True, False])
def test_a_truncated_mnist_file_is_named_not_blamed_on_the_network(download, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(require_data() / "MNIST" / "raw", raw)
    with (raw / "t10k-labels-idx1-ubyte").open("r+b") as f:
        f.truncate(5000)
    cfg = load_config(None, [f"data.root={tmp_path}", f"data.download={str(download).lower()}"]).data
    with pytest.raises(UserError) as e:
        load_data(cfg)
    assert str(e.value).startswith(f"{raw / 't10k-labels-idx1-ubyte'} is damaged (5,000 bytes where its header "
                                   f"declares 10,008)") and "no network" not in str(e.value)


def _folder(root, n=6):
    for i in range(n):
        Image.new("RGB", (20, 20), (40 * i, 10, 200 - 30 * i)).save(root / f"{i}.png")


def test_a_truncated_decode_cache_is_rebuilt(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    _folder(tmp_path / "img")
    cfg = load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'img'}", "data.cache=true",
                             f"data.cache_dir={tmp_path / 'cache'}", "data.img_size=8", "data.num_workers=0"]).data
    first = load_data(cfg)[0].images.clone()
    (cache,) = (tmp_path / "cache").glob(f"images-{len(first)}-*.npy")  # the training split's
    with cache.open("r+b") as f:
        f.truncate(cache.stat().st_size - 50)
    again = load_data(cfg)[0].images
    assert torch.equal(again, first) and "is damaged" in capsys.readouterr().err
    assert np.load(cache).shape == tuple(first.shape)


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "images-1.npy"
    ours = private_temporary(target)  # this (living) process's
    theirs = ours.with_name(f"{target.name}.{socket.gethostname()}.{dead.pid}.tmp")
    elsewhere = ours.with_name(f"{target.name}.other-machine.{dead.pid}.tmp")  # another machine's: not ours to judge
    for p in (ours, theirs, elsewhere):
        p.write_text("partial")
    assert remove_stale_temporaries(tmp_path) == [theirs]
    assert ours.exists() and elsewhere.exists() and not theirs.exists()


# ---- settings that cannot take effect ----------------------------------------------------------------------------

def test_warm_ups_longer_than_the_run_are_said(tmp_path):
    res = train_cli(["-c", MNIST, "-e", str(tmp_path / "r"), "train.steps=10", "train.warmup_steps=40",
                     "loss.kl_warmup_steps=10", "--dry-run"])
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    assert res.returncode == 0 and len(warnings) == 2
    assert "never reaches train.lr=0.001 (it peaks at 0.00025)" in warnings[0]
    assert "ends at 90% of it" in warnings[1]
    assert train_cli(["-c", MNIST, "train.steps=10", "train.warmup_steps=10", "--dry-run"]).stderr == ""


def test_a_launch_that_got_one_process_is_said(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    res = train_cli(["-c", MNIST, "--dry-run"])
    assert res.returncode == 0 and "warning: the launch asked for several processes but this run has one" in res.stderr
    assert train_vae.launch_warnings(2) == []


def test_bf16_on_a_cpu_without_bf16_instructions_is_said(monkeypatch):
    # what this machine's CPU has decides whether the real CLI warns
    res = train_cli(["-c", MNIST, "--dry-run", "train.mixed_precision=bf16"])
    assert res.returncode == 0 and ("converting kernels" in res.stderr) == (not native_cpu_bf16())
    # and each case, whatever this CPU: the launcher's setting counts, a GPU or a bf16 CPU does not warn
    monkeypatch.setattr(train_vae, "native_cpu_bf16", lambda: False)
    assert "train.mixed_precision=no" in train_vae.precision_warnings("bf16", "cpu")[0]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert len(train_vae.precision_warnings("launcher", "cpu")) == 1
    assert train_vae.precision_warnings("no", "cpu") == train_vae.precision_warnings("bf16", "cuda") == []
    monkeypatch.setattr(train_vae, "native_cpu_bf16", lambda: True)
    assert train_vae.precision_warnings("bf16", "cpu") == []


# ---- advice that fits the cause ----------------------------------------------------------------------------------

def test_accelerates_precision_is_checked_as_the_configs_is(monkeypatch, tmp_path, real_data):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8x")
    res = train_cli(["-c", MNIST, "-e", str(tmp_path / "run"), "train.steps=1"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and not (tmp_path / "run").exists(), res.stderr
    assert lines[0].startswith("error: ACCELERATE_MIXED_PRECISION=fp8x (accelerate's setting, which "
                               "train.mixed_precision=launcher takes) is not one of no, fp16, bf16")
    assert train_cli(["-c", MNIST, "--dry-run"]).returncode == 2  # before anything, a dry run included
    # the config's own setting wins over accelerate's, as the Accelerator is then told it
    assert train_cli(["-c", MNIST, "--dry-run", "train.mixed_precision=no"]).returncode == 0
    for fine in ("no", "bf16"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", fine)
        assert train_cli(["-c", MNIST, "--dry-run"]).returncode == 0


def test_each_write_failure_gets_its_own_advice(tmp_path):
    assert "ulimit -f" in disk_advice(OSError(errno.EFBIG, "File too large"), tmp_path)
    assert "free disk space" in disk_advice(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert "writable" in disk_advice(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert "free disk space" in disk_advice(RuntimeError("I/O error: No space left on device (os error 28)"), tmp_path)
    assert "--overwrite" in after_failed_write(tmp_path) and "-r latest" not in after_failed_write(tmp_path)


def test_a_first_checkpoint_that_cannot_be_written_is_not_offered_for_resume(tmp_path, real_data, monkeypatch):
    from accelerate import Accelerator

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full)
    res = train_cli(["-c", MNIST, "-e", str(tmp_path / "r"), *FAST, "train.steps=2", "train.save_every=1"])
    line = res.stderr.strip().splitlines()[-1]  # (after the progress bar)
    assert res.returncode == 2 and line.startswith("error: could not write checkpoint"), res.stderr
    assert "free disk space" in line and "start the run again with --overwrite" in line and "-r latest" not in line


# ---- outputs -----------------------------------------------------------------------------------------------------

def test_weights_are_as_readable_as_their_siblings(tiny_run, tmp_path):
    mode = stat.S_IMODE(os.stat(tiny_run / "config.yaml").st_mode)
    ckpt = next((tiny_run / "checkpoints").iterdir())
    for f in [tiny_run / "model.safetensors", *ckpt.iterdir()]:
        assert stat.S_IMODE(os.stat(f).st_mode) == mode, f
    out = tmp_path / "hub"
    assert cli(exporter.main, [str(tiny_run), str(out)]).returncode == 0
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) == mode


def test_a_datasets_folder_with_one_split_holds_out_a_fraction(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((8, 8), 10 * i, dtype=np.uint8)) for i in range(20)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})) \
        .save_to_disk(str(tmp_path / "one"))
    cfg = load_config(None, ["data.name=hf", f"data.root={tmp_path / 'one'}", "data.channels=1", "data.img_size=8",
                             "data.test_fraction=0.2"]).data
    train_set, test_set, summary = load_data(cfg, 0)
    assert (len(train_set), len(test_set)) == (16, 4) and "(the set has no 'test' split)" in summary
    named = load_config(None, ["data.name=hf", f"data.root={tmp_path / 'one'}", "data.hf_test_split=valid"]).data
    with pytest.raises(UserError, match="is not a split of this data set"):
        load_data(named, 0)


def test_the_command_is_recorded_and_quoted_by_the_card(tmp_path, real_data):
    run = tmp_path / "r"
    train(run, extra=["train.steps=2", "train.save_every=2"])
    first = (run / "command.txt").read_text().splitlines()
    assert first == ["python train_vae.py " + " ".join(["-c", MNIST, "-e", str(run), *FAST, "train.steps=2",
                                                         "train.save_every=2"])]
    assert train_cli(["-r", "latest", "-e", str(run), "train.steps=3"]).returncode == 0
    lines = (run / "command.txt").read_text().splitlines()
    assert lines[0] == first[0] and lines[1].startswith("# resumed at step 2: python train_vae.py -r latest")
    assert cli(exporter.main, [str(run), str(tmp_path / "hub")]).returncode == 0
    assert f"`{first[0]}`" in (tmp_path / "hub" / "README.md").read_text()


def test_sample_writes_beside_a_hub_folder_not_into_it(tiny_run, tmp_path):
    hub = tmp_path / "hub"
    assert cli(exporter.main, [str(tiny_run), str(hub)]).returncode == 0
    before = sorted(p.name for p in hub.iterdir())
    res = cli(sample.main, ["--exp_dir", str(hub), "--mode", "sample", "--n_samples", "4",
                            "--data_root", str(DATA)])
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in hub.iterdir()) == before
    assert (tmp_path / "hub-sample" / "samples.png").is_file()


# ---- the table of refusals in docs/errors.md ----------------------------------------------------------------

def refusal_rows() -> list[tuple[str, str, str]]:
    """(entry point, input, message) of every row of docs/errors.md's table."""
    rows = []
    for line in (REPO / "docs" / "errors.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) == 3:
            rows.append(tuple(c.strip("`").strip() for c in cells))
    return rows


ENTRY_POINTS = {"train_vae.py": train_vae.main, "sample.py": sample.main, "evaluate.py": evaluate.main,
                "python -m utils.inference.export": exporter.main}


def test_the_documented_refusals_are_what_the_entry_points_say(tiny_run, tmp_path, monkeypatch):
    rows = refusal_rows()
    assert len(rows) >= 30 and {r[0] for r in rows} == {*ENTRY_POINTS, "TrainedVAE.load"}
    shutil.copytree(tiny_run, tmp_path / "run")
    (tmp_path / "file.txt").write_text("not a run")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trained_module, "hub_reachable", lambda: False)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for entry, given, says in rows:
        if entry == "TrainedVAE.load":
            with pytest.raises(UserError) as e:
                TrainedVAE.load(given)
            line = str(e.value)
        else:
            res = cli(ENTRY_POINTS[entry], shlex.split(given))
            assert res.returncode == 2, (entry, given, res.stderr)
            line = res.stderr.strip().splitlines()[-1]
        assert says in line, (entry, given, line)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written by any refusal


def test_a_damaged_cifar_folder_is_named_not_called_missing(tmp_path):
    where = tmp_path / "cifar-10-batches-py"
    where.mkdir()
    (where / "data_batch_1").write_bytes(b"\x80\x04 cut short")
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path}", "data.download=false"]).data
    with pytest.raises(UserError, match=f"the CIFAR10 files in {where} are incomplete or damaged"):
        load_data(cfg)
    (where / "data_batch_1").unlink()  # an empty folder is missing data, as before
    with pytest.raises(UserError, match="CIFAR10 not found in"):
        load_data(cfg)
