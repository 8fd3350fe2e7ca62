"""sample.py on short real MNIST runs: every mode, pixel sizes, determinism, latent maths, bad input."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
from conftest import REPO, run_script, train
from utils.data import TensorImages
from utils.errors import run_cli
from utils.latents import interpolate, traversal_codes
from utils.loading import load_run


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[int, Path]:
    """Two short MLP runs: z=2 (the latent plane itself) and z=5 (PCA, traversal ordering)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for z in (2, 5):
        out[z] = root / "runs" / f"z{z}"
        train(out[z], extra=["train.steps=30", f"model.z_dim={z}", "model.hidden=64", "train.log_every=10"])
    return out


def call(argv: list[str]) -> None:
    run_cli(sample.main, argv)


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def tiles(n: int, tile: int = 28, pad: int = 2) -> int:
    """Pixels spanned by n tiles in a torchvision grid."""
    return n * (tile + pad) + pad


@pytest.mark.parametrize("mode, files", [
    ("sample", {"samples.png": (tiles(5), tiles(5))}),
    ("interpolate", {"interpolate_prior_linear.png": (tiles(7), tiles(3)),
                     "interpolate_test_linear.png": (tiles(7), tiles(3))}),
    ("traverse", {"traverse.png": (90 + tiles(9), tiles(5)), "traverse.gif": (tiles(5), tiles(1))}),
    ("reconstruct", {"reconstructions.png": (tiles(8), tiles(2 * 4))}),
    ("visualize_latent", {"latent_scatter.png": (700, 600), "kl_per_dim.png": (700, 400)}),
])
def test_every_mode_writes_images_of_the_expected_size(runs, mode, files, tmp_path):
    out = tmp_path / mode
    call(["--exp_dir", str(runs[5]), "--mode", mode, "--save_dir", str(out), "--n_samples", "25" if mode == "sample"
          else "32", "--n_pairs", "3", "--n_interpolate", "7", "--n_traverse", "9", "--kl_samples", "500"])
    assert {p.name: size(p) for p in out.iterdir()} == files


def test_traverse_top_dimensions_by_kl(runs, tmp_path):
    call(["--exp_dir", str(runs[5]), "--mode", "traverse", "--n_dims", "2", "--n_traverse", "5",
          "--save_dir", str(tmp_path), "--kl_samples", "300"])
    assert size(tmp_path / "traverse.png") == (90 + tiles(5), tiles(2))


def test_default_save_dir_and_individual_pngs(runs):
    call(["--exp_dir", str(runs[2]), "--mode", "sample", "--n_samples", "4", "--individual"])
    names = sorted(p.name for p in (runs[2] / "sample").iterdir())
    assert names == ["sample_0000.png", "sample_0001.png", "sample_0002.png", "sample_0003.png", "samples.png"]
    assert size(runs[2] / "sample" / "sample_0000.png") == (28, 28)


def test_latent_plane_for_two_dimensions(runs, tmp_path):
    call(["--exp_dir", str(runs[2]), "--mode", "visualize_latent", "--save_dir", str(tmp_path), "--kl_samples", "500"])
    assert size(tmp_path / "latent_scatter.png") == (700, 600)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("mode", ["sample", "interpolate", "traverse", "reconstruct"])
def test_same_seed_same_bytes(runs, mode, tmp_path):
    common = ["--exp_dir", str(runs[5]), "--mode", mode, "--kl_samples", "300", "--interp", "slerp"]
    call([*common, "--seed", "3", "--save_dir", str(tmp_path / "a")])
    call([*common, "--seed", "3", "--save_dir", str(tmp_path / "b")])
    call([*common, "--seed", "4", "--save_dir", str(tmp_path / "c")])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_traversal_changes_only_its_coordinate():
    base = torch.randn(6)
    values = torch.linspace(-3, 3, 7)
    codes = traversal_codes(base, [4, 1], values)
    assert codes.shape == (2, 7, 6)
    for r, d in enumerate([4, 1]):
        diff = codes[r] - base
        assert torch.equal(codes[r, :, d], values)
        others = [k for k in range(6) if k != d]
        assert torch.equal(diff[:, others], torch.zeros(7, 5))


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolation_endpoints_decode_to_the_endpoints(runs, method):
    _, model, _, _ = load_run(str(runs[5]), None, None)
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    codes = interpolate(z0, z1, 6, method)
    assert torch.equal(codes[:, 0], z0) and torch.equal(codes[:, -1], z1)
    with torch.no_grad():
        assert torch.equal(model.decode(codes[:, 0]), model.decode(z0))
        assert torch.equal(model.decode(codes[:, -1]), model.decode(z1))
    if method == "slerp":  # on the great circle: norms interpolate between the endpoints' norms, not below
        n0, n1, mid = z0.norm(dim=1), z1.norm(dim=1), codes[:, 3].norm(dim=1)
        assert torch.all(mid >= torch.minimum(n0, n1) - 1e-5)
    else:
        assert torch.allclose(codes[:, 3], z0 + 0.6 * (z1 - z0))


def test_newest_run_is_used_and_named(runs):
    proc = run_script([str(REPO / "sample.py"), "--mode", "sample", "--n_samples", "4"], cwd=runs[5].parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert "using the newest run: runs/z" in proc.stdout


def test_config_and_weights_form(runs, tmp_path):
    call(["-c", str(runs[5] / "config.yaml"), "--weights", str(runs[5] / "model.safetensors"), "--mode",
          "reconstruct", "--n_samples", "8", "--save_dir", str(tmp_path)])
    assert size(tmp_path / "reconstructions.png") == (tiles(8), tiles(2))


def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys, monkeypatch):
    bad_z = tmp_path / "bad_z.yaml"
    bad_z.write_text((runs[5] / "config.yaml").read_text().replace("z_dim: 5", "z_dim: 7"))
    cases = [
        (["--exp_dir", str(tmp_path / "nope")], "not a run directory"),
        (["--exp_dir", str(runs[5]), "--mode", "dream"], "unknown --mode 'dream'"),
        (["--exp_dir", str(runs[5]), "--mode", "traverse", "--traverse_dim", "5"], "--traverse_dim 5"),
        (["--exp_dir", str(runs[5]), "--n_interpolate", "1"], "--n_interpolate must be at least 2"),
        (["-c", str(bad_z), "--weights", str(runs[5] / "model.safetensors")],
         "do not fit the config's model (z_dim=7"),
        (["-c", str(runs[5] / "config.yaml"), "--weights", str(tmp_path / "none.safetensors")], "not found"),
        (["-c", str(runs[5] / "config.yaml")], "-c and --weights go together"),
        (["--exp_dir", str(runs[5]), "--bogus"], "unknown argument --bogus"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            call(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err, (argv, err)

    shutil.copytree(runs[5], tmp_path / "nomodel")
    (tmp_path / "nomodel" / "model.safetensors").unlink()
    with pytest.raises(SystemExit):
        call(["--exp_dir", str(tmp_path / "nomodel")])
    assert "train first" in capsys.readouterr().err

    unlabelled = TensorImages(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), None)
    monkeypatch.setattr(sample, "load_data", lambda cfg: (unlabelled, unlabelled, ""))
    with pytest.raises(SystemExit) as e:
        call(["--exp_dir", str(runs[5]), "--mode", "visualize_latent"])
    assert e.value.code == 2 and "has no labels" in capsys.readouterr().err


def test_no_run_found(tmp_path):
    proc = run_script([str(REPO / "sample.py")], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no run with model.safetensors found under runs/")
