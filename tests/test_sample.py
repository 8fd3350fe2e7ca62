"""sample.py on short real MNIST runs: every mode, pixel sizes, determinism, latent maths, bad input."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import cli, run_script, train
from utils.data.registry import load_data
from utils.data.splits import TensorImages
from utils.errors import guarded_main
from utils.evaluation.latents import interpolate, posterior_stats, traversal_codes
from utils.grids import LABEL_MARGIN, grid, to_pil
from utils.inference import modes
from utils.inference.loading import load_trained


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
    guarded_main(sample.main, argv)


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


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
          "--save_dir", str(tmp_path), "--kl_samples", "300", "--seed", "7"])
    assert size(tmp_path / "traverse.png") == (LABEL_MARGIN + tiles(5), tiles(2))
    written = pixels(tmp_path / "traverse.png")[:, LABEL_MARGIN:]
    # the same picture rebuilt independently: KL per dimension over the same 300 test images, and the base code
    # that sample.py takes (the posterior mean of the test image its seeded generator picks)
    cfg, model, _, _ = load_trained(str(runs[5]), None, None)
    test = load_data(cfg.data)[1]
    _, kl = posterior_stats(model, test, 100, 300)
    with torch.no_grad():
        base = model.encode(test.batch(modes.pick(1, len(test), torch.Generator().manual_seed(7))))[0][0]

    def picture(dims: list[int]) -> np.ndarray:
        with torch.no_grad():
            x = model.decode(traversal_codes(base, dims, torch.linspace(-3, 3, 5)).flatten(0, 1))
        return np.asarray(to_pil(grid(x, per_row=5)).convert("RGB"))

    descending = torch.argsort(kl, descending=True).tolist()
    assert np.array_equal(written, picture(descending[:2]))  # rows: the two most informative, most first
    for other in (descending[:2][::-1], descending[::-1][:2]):  # swapped, or the least informative ones
        assert not np.array_equal(written, picture(other)), other


def test_default_save_dir_and_individual_pngs(runs):
    call(["--exp_dir", str(runs[2]), "--mode", "sample", "--n_samples", "4", "--individual"])
    names = sorted(p.name for p in (runs[2] / "sample").iterdir())
    assert names == ["sample_0000.png", "sample_0001.png", "sample_0002.png", "sample_0003.png", "samples.png"]
    assert size(runs[2] / "sample" / "sample_0000.png") == (28, 28)
    # each individual PNG is its tile of the grid (2 x 2 here)
    whole = pixels(runs[2] / "sample" / "samples.png")
    for i in range(4):
        r, c = divmod(i, 2)
        tile = whole[2 + r * 30:2 + r * 30 + 28, 2 + c * 30:2 + c * 30 + 28]
        assert np.array_equal(pixels(runs[2] / "sample" / f"sample_{i:04d}.png"), tile), i
    assert not np.array_equal(pixels(runs[2] / "sample" / "sample_0000.png"),
                              pixels(runs[2] / "sample" / "sample_0001.png"))


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


def test_linear_interpolation_is_the_straight_line():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    codes = interpolate(z0, z1, 6, "linear")
    assert codes.shape == (4, 6, 5)
    for k in range(6):
        t = k / 5
        assert torch.allclose(codes[:, k], z0 + t * (z1 - z0), atol=1e-6), k


def test_slerp_follows_the_great_circle():
    g = torch.Generator().manual_seed(0)
    # pairs of orthogonal codes of equal norm r: every code has norm r, and consecutive codes are equal angles apart
    a = torch.randn(3, 6, generator=g)
    b = torch.randn(3, 6, generator=g)
    b = b - (b * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a  # orthogonal to a
    r = torch.tensor([[0.5], [1.0], [3.0]])
    z0, z1 = r * a / a.norm(dim=1, keepdim=True), r * b / b.norm(dim=1, keepdim=True)
    codes = interpolate(z0, z1, 7, "slerp")
    assert torch.allclose(codes.norm(dim=2), r.expand(3, 7), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(codes[:, :-1], codes[:, 1:], dim=2).clamp(-1, 1)
    assert torch.allclose(torch.acos(cos), torch.full((3, 6), math.pi / 2 / 6), atol=1e-3)
    # unit vectors: the midpoint is (z0 + z1) / sqrt(2), not the linear midpoint (of norm 1 / sqrt(2))
    e0, e1 = torch.eye(5)[:1], torch.eye(5)[3:4]
    mid = interpolate(e0, e1, 3, "slerp")[0, 1]
    assert torch.allclose(mid, (e0[0] + e1[0]) / math.sqrt(2), atol=1e-6)
    assert not torch.allclose(mid, interpolate(e0, e1, 3, "linear")[0, 1], atol=1e-2)
    # parallel codes (no great circle): the straight line
    p0 = torch.randn(2, 5, generator=g)
    p1 = 2.5 * p0
    assert torch.allclose(interpolate(p0, p1, 5, "slerp"), interpolate(p0, p1, 5, "linear"), atol=1e-6)
    assert torch.isfinite(interpolate(p0, p1, 5, "slerp")).all()


def test_newest_run_is_used_and_named(runs, monkeypatch):
    monkeypatch.chdir(runs[5].parent.parent)  # where runs/ is
    now = time.time()
    for newest, older in ((2, 5), (5, 2)):
        os.utime(runs[older], (now - 100, now - 100))
        os.utime(runs[newest], (now, now))
        res = cli(sample.main, ["--mode", "sample", "--n_samples", "4", "--save_dir", f"out{newest}"])
        assert res.returncode == 0, res.stderr
        assert f"using the newest run: runs/z{newest} (pass --exp_dir" in res.stdout


def test_config_and_weights_form(runs, tmp_path):
    common = ["--mode", "reconstruct", "--n_samples", "8", "--seed", "2"]
    call(["-c", str(runs[5] / "config.yaml"), "--weights", str(runs[5] / "model.safetensors"), *common,
          "--save_dir", str(tmp_path / "cw")])
    assert size(tmp_path / "cw" / "reconstructions.png") == (tiles(8), tiles(2))
    call(["--exp_dir", str(runs[5]), *common, "--save_dir", str(tmp_path / "run")])
    assert digest(tmp_path / "cw") == digest(tmp_path / "run")  # the same model, the same picture
    call(["-c", str(runs[2] / "config.yaml"), "--weights", str(runs[2] / "model.safetensors"), *common,
          "--save_dir", str(tmp_path / "other")])
    assert digest(tmp_path / "other") != digest(tmp_path / "cw")  # another model's weights: another picture


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
    monkeypatch.setattr("utils.data.registry.load_data", lambda cfg: (unlabelled, unlabelled, ""))
    with pytest.raises(SystemExit) as e:
        call(["--exp_dir", str(runs[5]), "--mode", "visualize_latent"])
    assert e.value.code == 2 and "has no labels" in capsys.readouterr().err


def test_no_run_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli(sample.main, [])
    assert res.returncode == 2
    assert res.stderr.startswith("error: no run with model.safetensors found under runs/")
    assert res.stderr.count("\n") == 1


# What sample.py must not have loaded when it answers --help or refuses a flag: the wait is torch's and more.
HEAVY = ("torch", "torchvision", "accelerate", "sklearn", "matplotlib", "datasets", "torch._dynamo")
REPORT_HEAVY = f"""
import runpy, sys
sys.argv, code = ["sample.py", *sys.argv[1:]], 0
try:
    runpy.run_path("sample.py", run_name="__main__")
except SystemExit as e:
    code = e.code
print("loaded:", *sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("argv, answer", [
    (["--help"], "--traverse_range TRAVERSE_RANGE"),
    (["--bogus"], "error: unknown argument --bogus"),
    (["--mode", "dream"], "error: unknown --mode 'dream'"),
    (["--n_samples", "0"], "error: --n_samples must be at least 1, got 0"),
    (["--mode", "traverse", "--n_dims", "-1"], "error: --n_dims must be 0 (every dimension) or more, got -1"),
    (["--mode", "reconstruct", "--sampler", "gmm"], "error: --sampler has no effect here"),
    (["--sampler", "nope"], "error: unknown --sampler 'nope'"),
    (["--n_samples"], "error: argument --n_samples: expected one argument"),
])
def test_help_and_bad_flags_answer_before_torch_loads(argv, answer):
    proc = run_script(["-c", REPORT_HEAVY, *argv], timeout=120)
    assert proc.returncode == (0 if argv == ["--help"] else 2), proc.stderr
    assert answer in proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == "loaded:", proc.stderr  # none of HEAVY


def test_prior_samples_are_drawn_and_written_without_torchvision(runs, tmp_path):
    """Importing torchvision loads its models and torch._dynamo: a grid of prior samples needs neither."""
    proc = run_script(["-c", REPORT_HEAVY, "--exp_dir", str(runs[2]), "--n_samples", "4", "--save_dir",
                       str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == "loaded: accelerate torch"
    assert size(tmp_path / "samples.png") == (tiles(2), tiles(2))


@pytest.mark.parametrize("n, channels", [(1, 1), (1, 3), (3, 1), (7, 3), (16, 1)])
def test_grids_are_the_bytes_torchvision_writes(n, channels, tmp_path):
    """utils/grids.py lays out and rounds as torchvision's make_grid and save_image do (bytes written before
    it stopped importing torchvision load again): the reference is torchvision itself."""
    from torchvision.utils import make_grid, save_image

    from utils.grids import save_grid

    images = torch.rand(n, channels, 6, 5, generator=torch.Generator().manual_seed(n))
    images[0, 0, 0, :3] = torch.tensor([0.5, 1.5, 2.5]) / 255  # values on the rounding's edges
    for per_row in (1, 3, 8):
        assert torch.equal(grid(images, per_row), make_grid(images, nrow=per_row, padding=2, pad_value=1.0))
        save_image(images, tmp_path / "torchvision.png", nrow=per_row, padding=2, pad_value=1.0)
        save_grid(images, tmp_path / "ours.png", per_row)
        assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "torchvision.png").read_bytes(), per_row


def mode_temperature(model, cfg, args, g, out: Path) -> list[Path]:
    """One row per --temperatures value: the same --n_samples codes from --sampler, each scaled by it."""
    import torch

    from utils.grids import save_grid

    z = args.draw(args.n_samples, g)  # from --sampler (the prior unless another is asked for)
    codes = torch.cat([t * z for t in args.temperatures])
    x = modes.decode(model, codes, args.batch_size, modes.labels_for(model, args, len(codes), g))
    path = out / "temperature.png"
    save_grid(x, path, per_row=args.n_samples)
    return [path]


def test_a_mode_added_to_the_registry_alone_gets_its_flag_its_checks_and_its_files(runs, tmp_path, monkeypatch):
    """docs/extending.md's worked example: one function and one MODES entry, nothing in sample.py."""
    monkeypatch.setitem(modes.MODES, "temperature", modes.Mode(mode_temperature, draws=lambda args: True, flags=(
        modes.flag("--temperatures", type=float, nargs="+", default=[0.5, 1.0, 1.5],
                   valid=(lambda ts: all(t > 0 for t in ts), "must all be positive"),
                   help="temperature: the scales of the codes, one row each"),
    )))
    helped = " ".join(cli(sample.main, ["--help"]).stdout.split())
    assert "--temperatures TEMPERATURES [TEMPERATURES ...] temperature: the scales of the codes" in helped
    assert "one of sample, interpolate, traverse, reconstruct, visualize_latent, temperature" in helped
    assert "| `temperature` | One row per --temperatures value:" in modes.modes_markdown()
    # its check refuses a bad value before the run is even looked for; a mode that draws codes takes --sampler,
    # and refuses a sampler option the prior has not
    bad = cli(sample.main, ["--exp_dir", str(tmp_path / "nowhere"), "--mode", "temperature", "--temperatures", "0",
                            "1"])
    assert (bad.returncode, bad.stderr) == (2, "error: --temperatures must all be positive, got [0.0, 1.0]\n")
    bad = cli(sample.main, ["--exp_dir", str(runs[5]), "--mode", "temperature", "--gmm_components", "3"])
    assert bad.returncode == 2 and "--mode temperature draws from --sampler prior: drop it" in bad.stderr

    args = ["--exp_dir", str(runs[5]), "--n_samples", "3", "--seed", "3"]
    res = cli(sample.main, [*args, "--mode", "temperature", "--temperatures", "0.5", "1", "--sampler", "prior",
                            "--save_dir", str(tmp_path / "t")])
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {tmp_path / 't' / 'temperature.png'}\n"
    written = pixels(tmp_path / "t" / "temperature.png")
    assert written.shape == (tiles(2), tiles(3), 3)
    # the row at temperature 1 is what --mode sample draws with the same seed (there two tiles a row)
    cli(sample.main, [*args, "--mode", "sample", "--save_dir", str(tmp_path / "s")])
    drawn = pixels(tmp_path / "s" / "samples.png")
    for i in range(3):
        r, c = divmod(i, 2)
        tile = drawn[2 + r * 30:30 + r * 30, 2 + c * 30:30 + c * 30]
        assert np.array_equal(written[32:60, 2 + i * 30:30 + i * 30], tile), i
    # and the row at 0.5 decodes the same prior codes halved
    _, model, _, _ = load_trained(str(runs[5]), None, None)
    z = model.prior.sample(3, torch.Generator().manual_seed(3))
    halved = np.asarray(to_pil(grid(modes.decode(model, 0.5 * z, 8), per_row=3)).convert("RGB"))
    assert np.abs(written[:tiles(1)].astype(int) - halved[:tiles(1)].astype(int)).max() <= 1  # (rounding)
    assert not np.array_equal(written[2:30], written[32:60])


def test_a_flag_two_modes_read_is_one_declaration(monkeypatch):
    """A second, different --n_pairs would be a second add_argument (argparse's conflict) or a silent
    disagreement about its default and check: the registry refuses it and names the flag."""
    assert [f.dest for f in modes.mode_flags()].count("kl_samples") == 1  # traverse and visualize_latent share it
    monkeypatch.setitem(modes.MODES, "pairs", modes.Mode(mode_temperature, flags=(
        modes.flag("--n_pairs", type=int, default=3),)))
    with pytest.raises(ValueError, match="--mode pairs declares --n_pairs again"):
        modes.mode_flags()
