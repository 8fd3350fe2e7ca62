"""The Python API and the Hub layout, offline: export a real run, read the model card back with the library,
reload through the Hub mixin to bit-identical outputs, and the bound is evaluate.py's."""

from __future__ import annotations

import json
import math
import re
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

import evaluate
import sample
from conftest import REPO, cli, run_script
from utils.data.registry import load_data
from utils.errors import UserError
from utils.inference import export as exporter
from utils.inference.trained import TrainedVAE


@pytest.fixture(scope="module")
def evaluated(mnist_300, tmp_path_factory):
    """A copy of the 300-step run with an eval.json (IWAE k=20 on 100 test images)."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    shutil.copytree(mnist_300, run)
    res = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "elbo,nll,au", "--k", "20", "--n_test", "100"])
    assert res.returncode == 0, res.stderr
    return run


@pytest.fixture(scope="module")
def exported(evaluated, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "mnist-vae"
    res = cli(exporter.main, [str(evaluated), str(out)])
    assert res.returncode == 0, res.stderr
    return out


def test_hub_folder_and_its_model_card(evaluated, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                           "samples.png"]
    config = json.loads((exported / "config.json").read_text())
    assert config["vae_config"]["model"]["z_dim"] == 8 and config["vae_config"]["data"]["name"] == "mnist"
    card = ModelCard.load(exported / "README.md")  # the library's own parser
    assert card.data.library_name == "vae-toolkit" and "mnist" in card.data.tags
    nll = json.loads((evaluated / "eval.json").read_text())["nll"]
    assert f"{nll['nll']:.2f} nats" in card.text and "![64 prior samples](samples.png)" in card.text
    command = (evaluated / "command.txt").read_text().splitlines()[0]  # the command that was run, recorded at start
    assert command.startswith("python train_vae.py -c ") and f"`{command}`" in card.text and "z_dim: 8" in card.text


def test_reloaded_from_the_hub_layout_gives_the_same_outputs(evaluated, exported):
    a = TrainedVAE.load(evaluated)  # the run directory
    b = TrainedVAE.from_pretrained(str(exported))  # the mixin's loader, from the exported folder
    assert not b.training and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    test = load_data(a.config.data)[1]
    x = test.batch(torch.arange(16))
    draws = [m.sample(8, generator=torch.Generator().manual_seed(3)) for m in (a, b)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (8, 1, 28, 28)
    assert torch.equal(a.encode(x)[0], b.encode(x)[0]) and torch.equal(a.reconstruct(x), b.reconstruct(x))
    bounds = []
    for m in (a, b):
        torch.manual_seed(5)
        bounds.append(m.log_likelihood(x, k=50))
    assert torch.equal(bounds[0], bounds[1]) and bounds[0].shape == (16,)


def test_log_likelihood_is_evaluate_py_bound(evaluated):
    """evaluate.py seeds 0 and draws the k = 20 samples of each 100-image batch at once: the same call gives its
    number, and more samples give a bound that is no worse on average."""
    model = TrainedVAE.load(evaluated)
    x = load_data(model.config.data)[1].batch(torch.arange(100))
    torch.manual_seed(0)
    ours = model.log_likelihood(x, k=20, chunk=20).mean().item()
    theirs = json.loads((evaluated / "eval.json").read_text())["nll"]["nll"]
    assert ours == pytest.approx(-theirs, rel=1e-6)
    torch.manual_seed(0)
    assert model.log_likelihood(x, k=500).mean().item() > ours


def test_scripts_read_the_hub_folder(exported, tmp_path):
    res = cli(sample.main, ["--exp_dir", str(exported), "--mode", "reconstruct", "--n_samples", "8",
                            "--save_dir", str(tmp_path / "r")])
    assert res.returncode == 0 and (tmp_path / "r" / "reconstructions.png").is_file(), res.stderr
    res = cli(evaluate.main, ["--exp_dir", str(exported), "--metrics", "elbo", "--n_test", "100",
                              "--out", str(tmp_path / "e.json")])
    assert res.returncode == 0, res.stderr


def test_only_safetensors_and_one_line_errors(exported, evaluated, tmp_path, monkeypatch):
    pickled = tmp_path / "pickled"
    shutil.copytree(exported, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="only safetensors weights are loaded"):
        TrainedVAE.from_pretrained(str(pickled))
    res = cli(sample.main, ["--exp_dir", str(pickled), "--save_dir", str(tmp_path / "s")])
    assert res.returncode == 2 and "has no model.safetensors" in res.stderr
    res = cli(exporter.main, [str(evaluated), str(exported)])
    assert res.returncode == 2 and "is not empty" in res.stderr
    # everything up to the upload works offline; the upload itself fails in one line and keeps the folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    res = cli(exporter.main, [str(evaluated), str(tmp_path / "up"), "--push_to_hub", "someone/mnist-vae"])
    assert res.returncode == 2 and "the upload to someone/mnist-vae failed" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and (tmp_path / "up" / "model.safetensors").is_file()


def test_the_documented_python_example_runs_as_pasted(mnist_300, tmp_path):
    """The Python API example of docs/sampling-evaluation.md, with only the run's path replaced, in a fresh CPU-only
    interpreter started in a folder of the user's (the repository's root on the path, as the docs say)."""
    text = (REPO / "docs" / "sampling-evaluation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if b.startswith("# given a run trained by"))
    assert example.count("runs/mnist-20261202-101500") == 1
    (tmp_path / "runs").mkdir()
    shutil.copytree(mnist_300, tmp_path / "runs" / "mnist-20261202-101500")
    proc = run_script(["-c", example], cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("8 (16, 1, 28, 28) (16, 8) ")
    assert math.isfinite(float(proc.stdout.split()[-1]))
    assert (tmp_path / "hub" / "mnist" / "model.safetensors").is_file()
