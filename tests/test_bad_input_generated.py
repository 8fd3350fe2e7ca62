"""Generated bad input (hypothesis) at every entry point, in process and without training: overrides, command-line
arguments, config documents (non-text bytes too) and paths for train_vae.py (--dry-run), sample.py, evaluate.py,
the Python API's loader and the exporter; and damaged or foreign kept sampler files read by sample.py, evaluate.py,
the API and the exporter. Each case ends in success or in the toolkit's one-line error (exit 2 for
the command lines, ``UserError`` from the API), never in another exception or a traceback, and a refused command
writes no file."""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import evaluate
import sample
import train_vae
from conftest import REPO, cli
from models.sampler_rules import SamplerOptions, fitted_names
from utils.config import all_keys
from utils.errors import UserError
from utils.evaluation.samplers import kept_sampler_files
from utils.files import save_tensors
from utils.inference import TrainedVAE
from utils.inference import export as exporter
from utils.inference import trained as trained_module

pytestmark = pytest.mark.slow  # thousands of generated inputs at every entry point

MNIST = str(REPO / "configs" / "mnist.yaml")


def fast(n: int) -> settings:
    """n cases, the same ones on every run (derandomised), no example database, no per-case deadline."""
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None)


# values as a user might type them: numbers of every kind, words, YAML lists and mappings, nothing
values = st.one_of(
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "no", "null", "~", "", "[]", "[1, -2]", "{a: 1}", "1e-3", "3e-4", ".inf",
                     "-.nan", "0x10", "1_000", "'quoted'", "[400, 400]", "mlp", "kl", "bf16", "fp16", "launcher"]),
    st.text(string.printable, max_size=12))
keys = st.one_of(st.sampled_from(all_keys()), st.text(string.ascii_lowercase + "._", min_size=1, max_size=15))
override = st.tuples(keys, values, st.booleans()).map(lambda t: [f"{t[0]}={t[1]}"] if t[2] else [f"--{t[0]}", t[1]])
paths = st.one_of(st.sampled_from(["", ".", "..", "/", "nowhere", "./nowhere", "../nowhere", "a/b/c", "user/model",
                                   "file.txt", "empty_dir", "runs/x", "~/x", "-x", "\u00e9t\u00e9", "a" * 300]),
                  st.text(string.ascii_letters + "/._-~ ", max_size=20))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder with a file and an empty folder in it, and no network: the Hub is unreachable."""
    (tmp_path / "file.txt").write_text("not a run")
    (tmp_path / "empty_dir").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trained_module, "hub_reachable", lambda: False)
    return tmp_path


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def check(result, root: Path, before: set[str]) -> None:
    """Success, or exit 2 with one line that says what is wrong; and after a refusal, no new file."""
    assert result.returncode in (0, 2), result.stderr[-2000:]
    if result.returncode == 2:
        lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("warning: ")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 20, result.stderr
        assert listing(root) == before, listing(root) ^ before


@fast(1500)
@given(st.lists(override, max_size=4).map(lambda ls: [t for o in ls for t in o]))
def test_training_overrides(sandbox, argv):
    before = listing(sandbox)
    check(cli(train_vae.main, ["-c", MNIST, "-e", "run", *argv, "--dry-run"]), sandbox, before)
    assert listing(sandbox) == before  # --dry-run touches nothing, accepted or not


flags = st.sampled_from(["-c", "-e", "-r", "--overwrite", "--config", "--exp_dir", "--resume", "latest", MNIST,
                         "--debu", "-x", "--", "=", "a=b", "loss.beta", "--loss.beta"])


@fast(600)
@given(st.lists(st.one_of(flags, paths, values), max_size=6))
def test_training_arguments(sandbox, argv):
    before = listing(sandbox)
    check(cli(train_vae.main, [*argv, "--dry-run"]), sandbox, before)


documents = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=80),
    st.dictionaries(st.sampled_from(["data", "model", "loss", "train", "extra", "1"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=5),
                              st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=12), values, max_size=3)),
                    max_size=4).map(lambda d: "\n".join(f"{k}:\n" + (
                        "".join(f"  {kk}: {vv}\n" for kk, vv in v.items()) if isinstance(v, dict) else f"  {v}\n")
                        for k, v in d.items()).encode()))


@fast(800)
@given(documents)
def test_config_documents(sandbox, document):
    doc = sandbox / "doc.yaml"
    doc.write_bytes(document if isinstance(document, bytes) else document.encode("utf-8", "surrogatepass"))
    before = listing(sandbox)
    check(cli(train_vae.main, ["-c", str(doc), "-e", "run", "--dry-run"]), sandbox, before)


def script_arguments(options: list[str]):
    numbers = st.one_of(st.integers(-5, 10**9).map(str), st.sampled_from(["0", "-1", "nan", "inf", "x", "1.5", ""]))
    option = st.tuples(st.sampled_from(options), st.one_of(numbers, paths)).map(list)
    where = st.tuples(st.sampled_from(["--exp_dir", "-e", "-c", "--weights", "--data_root", "--save_dir", "--out"]),
                      paths).map(list)
    return st.lists(st.one_of(option, where, st.just(["--binarize"]), st.just(["--individual"]),
                              st.just(["--refit"])),
                    max_size=5).map(lambda ls: [t for o in ls for t in o])


SAMPLE_OPTIONS = ["--mode", "--seed", "--n_samples", "--label", "--batch_size", "--n_pairs", "--n_interpolate",
                  "--interp", "--n_traverse", "--traverse_range", "--traverse_dim", "--n_dims", "--from",
                  "--kl_samples", "--sampler", "--gmm_components", "--gmm_covariance", "--two_stage_steps"]
EVALUATE_OPTIONS = ["--metrics", "--k", "--n_test", "--batch_size", "--seed", "--fid_samples", "--fid_weights",
                    "--dis_batch", "--dis_train", "--dis_eval", "--dis_variance", "--mig_samples", "--dci_train",
                    "--dci_test", "--sampler", "--gmm_components", "--gmm_covariance", "--two_stage_steps"]


@pytest.mark.parametrize("main, options", [(sample.main, SAMPLE_OPTIONS), (evaluate.main, EVALUATE_OPTIONS)],
                         ids=["sample", "evaluate"])
@fast(500)
@given(data=st.data())
def test_script_arguments(sandbox, main, options, data):
    """No run exists here: every case ends in a one-line refusal, whatever its other arguments."""
    argv = data.draw(script_arguments(options))
    before = listing(sandbox)
    res = cli(main, argv)
    assert res.returncode == 2
    check(res, sandbox, before)


@fast(500)
@given(paths)
def test_the_api_loader(sandbox, path):
    try:
        TrainedVAE.load(path)
    except UserError as e:
        assert "\n" not in str(e) and len(str(e)) > 20
    else:
        pytest.fail(f"{path!r} loaded a model from nothing")


@fast(300)
@given(paths, paths, st.booleans())
def test_the_exporter(sandbox, run, out, push):
    before = listing(sandbox)
    res = cli(exporter.main, [run, out, *(["--push_to_hub", "someone/x"] if push else [])])
    assert res.returncode == 2
    check(res, sandbox, before)
    assert os.getcwd() == str(sandbox)


# Kept samplers, damaged or foreign, at each entry point that reads them: a run with both samplers fitted (small
# options, so that a refit is quick), a copy per case, one file damaged by a named kind or by bytes overwritten.
QUICK = {"gmm": ["--gmm_components", "2"], "two_stage": ["--two_stage_steps", "5"],
         "flow": ["--flow_layers", "2", "--flow_hidden", "8", "--flow_steps", "5"],
         "flow_matching": ["--flow_matching_hidden", "8", "--flow_matching_steps", "5",
                           "--flow_matching_ode_steps", "2"]}
QUICK_OPTIONS = SamplerOptions(gmm_components=2, two_stage_steps=5, flow_layers=2, flow_hidden=8, flow_steps=5,
                               flow_matching_hidden=8, flow_matching_steps=5, flow_matching_ode_steps=2)
DAMAGES = ["truncated", "empty", "garbage", "missing", "extra", "nan", "inf", "other z", "integers", "no fingerprint",
           "other fingerprint", "other z_dim", "options changed", "a folder", "a leftover"]


@pytest.fixture(scope="module")
def fitted_run(mnist_300, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fitted") / "run"
    shutil.copytree(mnist_300, run)
    vae = TrainedVAE.load(run)
    for name in fitted_names():
        vae.ex_post_sampler(name, options=QUICK_OPTIONS)
    return run


def damage_kept(path: Path, how) -> None:
    """One kind of damage (a name), or bytes written over the file at an offset (offset, bytes)."""
    if isinstance(how, tuple):
        data = bytearray(path.read_bytes())
        offset = how[0] % len(data)
        data[offset:offset + len(how[1])] = how[1]
        path.write_bytes(bytes(data))
        return
    if how in ("truncated", "empty", "garbage", "a folder", "a leftover"):
        data = path.read_bytes()
        if how == "a folder":
            path.unlink()
            path.mkdir()
        elif how == "a leftover":
            path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
        else:
            path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\xff" * 64}[how])
        return
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    state = load_file(path)
    first = sorted(state)[0]
    if how in ("missing", "extra", "nan", "inf", "other z", "integers"):
        state = {"missing": lambda: {k: v for k, v in state.items() if k != first},
                 "extra": lambda: {**state, "stray": torch.zeros(2)},
                 "nan": lambda: {**state, first: torch.full_like(state[first], float("nan"))},
                 "inf": lambda: {**state, first: torch.full_like(state[first], float("inf"))},
                 "other z": lambda: {k: torch.cat([v, v[..., :1]], -1) if v.dim() else v for k, v in state.items()},
                 "integers": lambda: {k: v.long() for k, v in state.items()}}[how]()
    else:
        key, value = {"no fingerprint": ("weights_sha256", None), "other fingerprint": ("weights_sha256", "0" * 64),
                      "other z_dim": ("z_dim", "3"), "options changed": ("seed", "7")}[how]
        meta = {k: v for k, v in meta.items() if k != key} | ({} if value is None else {key: value})
    save_tensors(state, path, metadata=meta)


kept_damage = st.one_of(st.sampled_from(DAMAGES), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)))


@fast(40)
@given(st.sampled_from(fitted_names()), kept_damage, st.sampled_from(["sample", "evaluate", "api", "export"]))
def test_kept_samplers_damaged_or_foreign(fitted_run, sandbox, name, how, where):
    """Each case ends in success (a refit, with a warning, where the file was fitted to other weights) or in one
    line naming the fix; the exporter always succeeds and copies only files that fit the model."""
    run = sandbox / f"run-{len(list(sandbox.iterdir()))}"
    shutil.copytree(fitted_run, run)
    damage_kept(run / "samplers" / f"{name}.safetensors", how)
    before = listing(sandbox)
    if where == "api":
        try:
            TrainedVAE.load(run).sample(2, sampler=name, options=QUICK_OPTIONS)
        except UserError as e:
            assert "\n" not in str(e) and "--" not in str(e), str(e)
        return
    if where == "export":
        hub = run.with_name(run.name + "-hub")
        res = cli(exporter.main, [str(run), str(hub)])
        assert res.returncode == 0, res.stderr
        kept, left_out = kept_sampler_files(hub, TrainedVAE.load(hub))
        assert not left_out and not list(hub.rglob("*.tmp"))
        return
    if where == "sample":
        res = cli(sample.main, ["--exp_dir", str(run), "--sampler", name, *QUICK[name],
                                "--n_samples", "4", "--save_dir", str(sandbox / "out")])
    else:
        res = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "samplers", *sum(QUICK.values(), []),
                                  "--n_test", "50",
                                  "--out", str(sandbox / "eval.json")])
    check(res, sandbox, before)
    if res.returncode == 2:
        assert "--refit" in res.stderr or "move it away" in res.stderr, res.stderr
