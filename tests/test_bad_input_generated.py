"""Generated bad input (hypothesis) at every entry point, in process and without training: overrides, command-line
arguments, config documents (non-text bytes too) and paths for train_vae.py (--dry-run), sample.py, evaluate.py,
the Python API's loader and the exporter. Each case ends in success or in the toolkit's one-line error (exit 2 for
the command lines, ``UserError`` from the API), never in another exception or a traceback, and a refused command
writes no file."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evaluate
import sample
import train_vae
from conftest import REPO, cli
from utils.config import all_keys
from utils.errors import UserError
from utils.inference import TrainedVAE
from utils.inference import export as exporter
from utils.inference import trained as trained_module

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
