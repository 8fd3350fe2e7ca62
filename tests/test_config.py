"""Config loading, overrides, and the one-line errors (exit code 2) for bad input."""

from __future__ import annotations

import pytest

import train_vae
from conftest import REPO, run_script
from utils.config import load_config, reference_markdown
from utils.errors import run_cli

MNIST = str(REPO / "configs" / "mnist.yaml")


def test_overrides_in_both_forms():
    cfg = load_config(MNIST, ["loss.beta=4", "--train.lr", "3e-4", "--model.channel_mults=[1, 2]"])
    assert cfg.loss.beta == 4.0 and isinstance(cfg.loss.beta, float)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.channel_mults == [1, 2]
    assert cfg.model.likelihood == "bernoulli"  # from the YAML
    assert cfg.train.seed == 0  # a default


def test_every_shipped_config_loads():
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert {"mnist.yaml", "mnist_beta_vae.yaml", "mnist_mmd_vae.yaml", "mnist_sigma_vae.yaml",
            "mnist_optimal_sigma_vae.yaml", "mnist_gaussian_vae.yaml", "mnist_mse_vae.yaml",
            "fashion_mnist.yaml"} <= set(names)
    for name in names:
        load_config(REPO / "configs" / name)


def test_readme_config_reference_is_current():
    assert reference_markdown() in (REPO / "README.md").read_text()


@pytest.mark.parametrize("args, needles", [
    (["loss.betta=4"], ["unknown config key 'loss.betta'", "loss.beta"]),
    (["--train.stepz", "5"], ["train.stepz", "train.steps"]),
    (["optim.lr=1"], ["unknown config key 'optim.lr'"]),
    (["train.steps=abc"], ["train.steps", "an integer"]),
    (["train.steps=2.5"], ["train.steps", "an integer"]),
    (["train.lr=fast"], ["train.lr", "a number"]),
    (["data.download=maybe"], ["data.download", "true or false"]),
    (["loss.beta=-1"], ["loss.beta", ">= 0"]),
    (["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    (["model.z_dim=0"], ["model.z_dim", ">= 1"]),
    (["train.lr=0"], ["train.lr", "> 0"]),
    (["model.likelihood=laplace"], ["model.likelihood", "bernoulli", "optimal_sigma"]),
    (["model.net=resnet"], ["model.net", "mlp, conv"]),
    (["data.name=imagenet"], ["data.name", "mnist"]),
    (["model.channel_mults=[1, 0]"], ["model.channel_mults", "positive integers"]),
    (["--loss.beta"], ["--loss.beta has no value"]),
    (["beta=4"], ["cannot read argument 'beta=4'"]),
])
def test_config_errors_are_one_line_exit_2(args, needles, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_cli(train_vae.main, ["-c", MNIST, "-e", str(tmp_path / "run"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "run").exists()  # nothing is written for a bad config


def test_file_errors(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  z_dim: 4\n likelihood: [\n")
    for argv, needle in [(["-c", str(tmp_path / "nope.yaml")], "not found"),
                         (["-c", str(bad)], "malformed YAML at line 3"),
                         ([], "no config given")]:
        with pytest.raises(SystemExit) as e:
            run_cli(train_vae.main, argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_cli_error_has_no_traceback(tmp_path):
    proc = run_script(["train_vae.py", "-c", MNIST, "-e", str(tmp_path / "r"), "loss.betta=4"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'loss.betta': did you mean 'loss.beta'?"]
