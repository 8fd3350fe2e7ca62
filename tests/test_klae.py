"""The KL autoencoder (model.net=klae) against diffusers itself: its export loads as an AutoencoderKL that encodes
and decodes as the toolkit does, its scaling_factor is latent-diffusion's over the training split, it fine-tunes
from a folder diffusers saved, resumes exactly, and refuses what diffusers cannot express in one line. Trained on
real CelebA faces (an image folder of 48 of them at 32x32, so the training split is quick to encode)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, FAST, REPO, train_cli
from models.klae import EPS, to_logits
from models.vae import VAE
from utils.config import load_config
from utils.data.registry import load_data
from utils.errors import UserError
from utils.inference import export as exporter
from utils.inference.trained import TrainedVAE

pytestmark = pytest.mark.slow  # each test trains a few steps end to end

TINY = ["data.name=image_folder", "data.img_size=32", "data.channels=3", "data.cache=false", "data.hflip=false",
        "model.block_channels=[8,16,16]", "model.norm_groups=8", "model.z_dim=256", "train.batch_size=8",
        "train.eval_samples=8", "train.lr=1e-3", "loss.disc_layers=1"]  # latents 4 x 8 x 8 (f = 4); 16-px patches


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faces")
    found = sorted((DATA / "celeba-10k" / "img_align_celeba").glob("*.jpg"))[:48]
    assert len(found) == 48, f"real CelebA faces expected under {DATA / 'celeba-10k'}"
    for f in found:
        shutil.copy(f, folder / f.name)
    return folder


def run_klae(run: Path, faces: Path, *extra: str) -> None:
    res = train_cli(["-c", str(REPO / "configs/celeba_klae.yaml"), "-e", str(run), *FAST, *TINY,
                     f"data.root={faces}", *extra])
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def exported(faces, tmp_path_factory) -> tuple[Path, Path]:
    run = tmp_path_factory.mktemp("klae") / "run"
    run_klae(run, faces, "train.steps=3")
    out = run.parent / "hub"
    exporter.export(run, out)
    return run, out


def test_diffusers_loads_the_export_and_decodes_and_encodes_as_the_toolkit(exported):
    run, out = exported
    ae = diffusers.AutoencoderKL.from_pretrained(out / "vae").eval()
    assert list(diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae").config.block_out_channels) == [8, 16, 16]
    assert (ae.config.in_channels, ae.config.latent_channels, ae.config.norm_num_groups) == (3, 4, 8)
    ours = TrainedVAE.load(run)
    z = 3 * torch.randn(16, 256, generator=torch.Generator().manual_seed(0))  # some pixels past [-1, 1] too
    x = load_data(ours.config.data)[1].batch(torch.arange(2))
    with torch.no_grad():
        d = ae.decode(z.view(16, 4, 8, 8)).sample
        theirs = (d / 2 + 0.5).clamp(0, 1)  # what a diffusers pipeline shows
        assert (ours.decode(z) - theirs).abs().max() <= 1e-5
        assert (TrainedVAE.load(out).decode(z) - theirs).abs().max() <= 1e-5  # the Hub layout reads back as well
        posterior = ae.encode(2 * x - 1).latent_dist
        mu, logvar = ours.encode(x)
        assert (mu - posterior.mean.flatten(1)).abs().max() <= 1e-5
        assert (logvar - posterior.logvar.flatten(1)).abs().max() <= 1e-5


def test_scaling_factor_is_one_over_the_std_of_posterior_samples_over_the_training_split(exported):
    """latent-diffusion's ``1 / z.flatten().std()`` of z = posterior.sample(), over all 46 training faces, drawn
    by diffusers (200 draws each): the exact value the export writes is within the draws' error of it."""
    run, out = exported
    config = json.loads((out / "vae" / "config.json").read_text())
    ae = diffusers.AutoencoderKL.from_pretrained(out / "vae").eval()
    train = load_data(load_config(run / "config.yaml").data)[0]
    assert len(train) == 46
    with torch.no_grad():
        posterior = ae.encode(2 * train.batch(torch.arange(46)) - 1).latent_dist
        g = torch.Generator().manual_seed(0)
        z = torch.stack([posterior.sample(generator=g) for _ in range(200)])
    assert config["scaling_factor"] == pytest.approx(1 / z.flatten().double().std().item(), rel=2e-3)
    assert config["shift_factor"] is None and config["sample_size"] == 32
    card = (out / "README.md").read_text()
    assert f"scaling_factor = {config['scaling_factor']:.6g}" in card and "all 46 training images" in card
    shifted = run.parent / "shifted"
    exporter.main([str(run), str(shifted), "--shift_factor"])
    again = json.loads((shifted / "vae" / "config.json").read_text())
    assert again["scaling_factor"] == config["scaling_factor"]
    assert again["shift_factor"] == pytest.approx(z.double().mean().item(), abs=3e-3 / config["scaling_factor"])


def test_decoded_image_has_the_gradient_of_the_unclamped_one_outside_the_range():
    d = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.7, 1.0, 2.5], requires_grad=True)
    image = torch.sigmoid(to_logits(d))
    assert (image - (d / 2 + 0.5).clamp(0, 1)).abs().max() <= EPS and EPS < 1e-5
    image.sum().backward()
    assert torch.allclose(d.grad[2:5], torch.full((3,), 0.5), atol=1e-6)
    # at the clamp's ends too, where a plain clamp gives 0 (float32's s(1 - s) within 2% there)
    assert torch.allclose(d.grad, torch.full_like(d, 0.5), rtol=0.02)


def test_fine_tuning_the_decoder_from_a_folder_diffusers_saved(faces, tmp_path):
    torch.manual_seed(1)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                            layers_per_block=1, latent_channels=4, norm_num_groups=8,
                            sample_size=32).save_pretrained(tmp_path / "sd")
    start = load_file(tmp_path / "sd" / "diffusion_pytorch_model.safetensors")
    run = tmp_path / "run"
    run_klae(run, faces, "train.steps=2", f"model.init_from={tmp_path / 'sd'}", "train.trainable=decoder")
    trained = load_file(run / "model.safetensors")
    encoder = {k for k in start if k.startswith(("encoder.", "quant_conv."))}
    assert encoder and all(torch.equal(trained[f"encoder.{k}"], start[k]) for k in encoder)  # loaded, then frozen
    moved = [k for k in start.keys() - encoder if not torch.equal(trained[f"decoder.{k}"], start[k])]
    assert len(moved) > len(start.keys() - encoder) // 2  # the decoder trained

    # the start of a run, as the trainer makes it: every tensor the folder's
    cfg = load_config(REPO / "configs/celeba_klae.yaml", [*TINY, f"model.init_from={tmp_path / 'sd'}"])
    vae = VAE(cfg.model, cfg.loss, (3, 32, 32))
    vae.decoder.init_from(vae.encoder, cfg.model.init_from, cfg.model, vae.img_shape)
    ours = {**vae.encoder.state_dict(), **vae.decoder.state_dict()}
    assert ours.keys() == start.keys() and all(torch.equal(ours[k], start[k]) for k in start)


def test_resume_equals_unbroken_run(faces, tmp_path):
    run_klae(tmp_path / "full", faces, "train.steps=4", "train.save_every=2")
    run_klae(tmp_path / "part", faces, "train.steps=2", "train.save_every=2")
    res = train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=4"])
    assert res.returncode == 0 and "at step 2" in res.stdout, res.stderr[-2000:]
    full, part = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


def test_shift_factor_of_a_run_without_a_diffusers_form_is_refused_and_writes_nothing(tiny_run, tmp_path):
    with pytest.raises(UserError, match="--shift_factor is a diffusers AutoencoderKL's, and .* is model.net=mlp"):
        exporter.export(tiny_run, tmp_path / "out", shift_factor=True)
    assert not (tmp_path / "out").exists()


def saved_folder(folder: Path, **changes) -> Path:
    """A diffusers AutoencoderKL folder of TINY's shape, with ``changes`` to its config."""
    diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            block_out_channels=(8, 16, 16), norm_num_groups=8, **changes).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra, said", [
    (["data.img_size=30"], "30x30 images do not divide by the latents' factor f=4"),
    (["model.block_channels=[8,12,16]"], "[12] not divisible by model.norm_groups=8"),
    (["model.z_dim=16"], "model.z_dim=16, but model.net=klae has latents 4x8x8 = 256 values: set model.z_dim=256"),
    (["model.likelihood=per_pixel_sigma"], "model.net=klae decodes one value per pixel"),
    (["model.net=conv", "model.init_from=sd"], "model.init_from reads a diffusers AutoencoderKL folder, which "
                                               "model.net=conv cannot take: use model.net=klae"),
    (["model.init_from=wide"], "has layers_per_block=2 and the config model.layers_per_block gives 1"),
    (["model.init_from=nowhere"], "model.init_from="),
    (["model.init_from=damaged"], "config.json cannot be read (JSONDecodeError)"),
])
def test_bad_input_is_one_line_and_writes_nothing(faces, tmp_path, extra, said):
    saved_folder(tmp_path / "wide", layers_per_block=2)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text("{not json")
    extra = [e.replace("=sd", f"={tmp_path / 'wide'}").replace("=wide", f"={tmp_path / 'wide'}")
             .replace("=nowhere", f"={tmp_path / 'nowhere'}").replace("=damaged", f"={tmp_path / 'damaged'}")
             for e in extra]
    res = train_cli(["-c", str(REPO / "configs/celeba_klae.yaml"), "-e", str(tmp_path / "run"), *FAST, *TINY,
                     f"data.root={faces}", "train.steps=1", *extra])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and said in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
