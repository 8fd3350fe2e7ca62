"""evaluate.py and sample.py answer --help and a bad option before the heavy libraries load: the metric and
sampler registries and their option declarations import none of them, and the scripts import what computes only
after their arguments are checked. Each case runs in a fresh interpreter, where sys.modules says what a command
loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ("torch", "torchvision", "accelerate", "sklearn", "matplotlib", "datasets")


def loaded(code: str) -> tuple[list[str], str]:
    """(the heavy modules loaded by ``code``, what it printed to stderr), in a new interpreter at the repository
    root; ``code`` may end in SystemExit, as a CLI does."""
    probe = (f"import json, sys\ntry:\n    exec({code!r})\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def evaluate(*argv: str, script: str = "evaluate.py") -> str:
    """Code that runs ``python evaluate.py ARGV`` (or another script), in this interpreter."""
    return (f"import runpy, sys\nsys.argv = [{script!r}, *{list(argv)!r}]\n"
            f"runpy.run_path({script!r}, run_name='__main__')")


def test_the_metric_registry_loads_no_heavy_library():
    modules, _ = loaded("import utils.evaluation.metrics as m\nm.metrics_markdown()\nm.metric_options()")
    assert modules == []


@pytest.mark.parametrize("argv, says", [(["--help"], ""), (["--k", "0"], "error: --k must be at least 1, got 0"),
                                        (["--dis_train", "-3"], "error: --dis_train must be at least 1, got -3"),
                                        (["--gmm_components", "0"], "error: --gmm_components must be at least 1"),
                                        (["--metrics", "samplers", "--two_stage_steps", "-1"], "two_stage_steps")])
def test_evaluate_answers_help_and_a_bad_option_before_torch(argv, says):
    modules, err = loaded(evaluate(*argv))
    assert says in err and len(err.strip().splitlines()) <= 1 or argv == ["--help"], err
    assert modules == []


@pytest.mark.parametrize("argv, says", [
    (["--sampler", "gmm", "--gmm_components", "0"], "gmm_components must be at least 1, got 0"),
    (["--sampler", "two_stage", "--two_stage_steps", "0"], "two_stage_steps must be at least 1"),
    (["--mode", "traverse", "--gmm_components", "3"], "--gmm_components is an option of --sampler gmm"),
    (["--sampler", "bogus"], "unknown --sampler 'bogus'")])
def test_sample_refuses_a_sampler_option_before_torch(argv, says):
    """The sampler flags are declared beside each sampler without torch (models/sampler_rules.py): a bad one is
    said before the model, or torch, loads."""
    modules, err = loaded(evaluate("--exp_dir", "nowhere", *argv, script="sample.py"))
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert modules == []


def test_what_each_metric_records_is_an_option_of_evaluate():
    """eval.json's computed_with reads each name of ``Metric.options`` from evaluate.py's parsed arguments: a
    name that no declaration gives (a shared option misspelt in ``reads``) would fail only after the work."""
    import evaluate
    from utils.evaluation.metrics import METRICS

    args = vars(evaluate.parse_arguments([]))
    assert {name: [o for o in m.options if o not in args] for name, m in METRICS.items()} == {n: [] for n in METRICS}
