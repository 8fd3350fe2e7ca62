"""The sharpening reconstruction terms (models/perceptual.py, models/lpips.py): each against its paper's
definition computed independently in float64 numpy, their gradients, how the objectives add them, a real run,
and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAST, REPO, train, train_cli
from models.config import LossConfig, ModelConfig
from models.perceptual import MSSSIM, TERMS, WATSON_DCT, FocalFrequency, Perceptual, WatsonDFT, ms_ssim_scales


def rand_pair(shape, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g)
    return x, (x + noise * torch.randn(*shape, generator=g)).clamp(0, 1)


def test_focal_frequency_is_the_papers_formula_on_a_4x4_image():
    x, x_hat = rand_pair((2, 1, 4, 4))
    diff = np.fft.fft2(x_hat.double().numpy(), norm="ortho") - np.fft.fft2(x.double().numpy(), norm="ortho")
    dist = np.abs(diff) ** 2
    w = np.abs(diff) / np.abs(diff).max(axis=(2, 3), keepdims=True)
    expected = (w * dist).mean(axis=(1, 2, 3))
    got = FocalFrequency((1, 4, 4), LossConfig())(x, x_hat)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_ms_ssim_fits_its_scales_to_the_image_and_matches_torchmetrics():
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, StructuralSimilarityIndexMeasure

    assert [ms_ssim_scales(s, s) for s in (10, 11, 21, 28, 64, 128, 161, 176)] == [0, 1, 2, 2, 3, 4, 4, 5]
    assert ms_ssim_scales(28, 200) == 2  # the shorter side decides
    x, x_hat = rand_pair((3, 3, 64, 64), noise=0.05)
    betas = (0.0448, 0.2856, 0.3001)
    ref = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, betas=tuple(b / sum(betas) for b in betas),
                                                     normalize="relu", reduction="none")(x_hat, x)
    torch.testing.assert_close(MSSSIM((3, 64, 64), LossConfig())(x, x_hat), 1 - ref, rtol=1e-5, atol=1e-6)
    x, x_hat = rand_pair((2, 1, 16, 16), noise=0.05)  # one scale: SSIM itself
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, reduction="none")(x_hat, x)
    torch.testing.assert_close(MSSSIM((1, 16, 16), LossConfig())(x, x_hat), 1 - ssim, rtol=1e-5, atol=1e-6)


def watson_by_hand(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Watson-DFT of one grey 8x8 block, float64: the paper's masking and pooling written out."""
    t = np.array(WATSON_DCT)
    idx = [0, 2, 4, 6, 7, 6, 4, 2]  # DFT index u has min(u, 8 − u) cycles, as DCT index 2·that
    t = t[idx][:, idx]
    f, f_hat = np.fft.fft2(255 * x, norm="ortho"), np.fft.fft2(255 * x_hat, norm="ortho")
    t_l = t * (abs(f[0, 0]) / abs(f[0, 0])) ** 0.649  # one block: its DC is the mean DC
    s = np.maximum(t_l, np.abs(f) ** 0.7 * t_l ** 0.3)
    return float(np.mean(np.abs((f_hat - f) / s) ** 4) ** 0.25)


def test_watson_dft_on_one_8x8_block_by_hand():
    x, x_hat = rand_pair((1, 1, 8, 8), noise=0.05)
    got = WatsonDFT((1, 8, 8), LossConfig())(x, x_hat)
    assert got.item() == pytest.approx(watson_by_hand(x[0, 0].double().numpy(), x_hat[0, 0].double().numpy()),
                                       rel=1e-4)


def test_watson_luminance_masking_raises_thresholds_of_brighter_blocks():
    """Two blocks with the same error: the brighter one (larger DC) masks more, so alone it scores less."""
    dark = torch.full((1, 1, 8, 8), 0.2)
    bright = torch.full((1, 1, 8, 8), 0.8)
    err = 0.02 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.cat([dark, bright], 3)
    term = WatsonDFT((1, 8, 16), LossConfig())
    only_dark = term(x, x + torch.cat([err, torch.zeros_like(err)], 3))
    only_bright = term(x, x + torch.cat([torch.zeros_like(err), err], 3))
    assert only_bright < only_dark


def test_watson_is_finite_on_black_and_grey_colour_blocks():
    """A black block (DC 0) and a grey colour block (chroma 0 before JPEG's offset of 128) would give thresholds
    of 0 and an infinite or undefined error, which stopped training at its first steps."""
    x = torch.cat([torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)], 3).requires_grad_(False)
    x_hat = (x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    d = WatsonDFT((3, 8, 16), LossConfig())(x, x_hat)
    d.sum().backward()
    assert torch.isfinite(d).all() and d.item() > 0 and torch.isfinite(x_hat.grad).all()


@pytest.mark.parametrize("name", ["focal_frequency", "ms_ssim", "watson_dft"])
def test_each_term_is_zero_for_identical_images_and_has_a_gradient(name):
    x, x_hat = rand_pair((2, 3, 32, 32))
    term = TERMS[name]((3, 32, 32), LossConfig())
    assert torch.all(term(x, x.clone()).abs() < 1e-6)
    x_hat = x_hat.requires_grad_()
    assert torch.is_grad_enabled()
    term(x, x_hat).sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    same = x.clone().requires_grad_()
    term(x, same).sum().backward()
    assert torch.isfinite(same.grad).all()


def vae_with(**loss):
    from models.vae import VAE

    model = ModelConfig(net="conv", z_dim=8, likelihood="sigma", channel_mults=[1, 2])
    return VAE(model, LossConfig(**loss), (1, 28, 28), 8)


@pytest.mark.parametrize("objective", ["elbo", "ae"])
def test_the_loss_gains_weight_times_pixels_times_term_and_the_bound_does_not(objective):
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reg = {"regulariser": "none"} if objective == "ae" else {}
    plain, sharp = vae_with(objective=objective, **reg), vae_with(objective=objective, focal_frequency=3.0,
                                                                   watson_dft=0.5, **reg)
    sharp.load_state_dict(plain.state_dict())  # the terms add no tensors to the model's state
    torch.manual_seed(1)
    a = plain(x, 10**6)
    torch.manual_seed(1)
    b = sharp(x, 10**6)
    x_hat = plain.likelihood.mean(plain.decoder_out(plain.encode(x)[0]).float()) if objective == "ae" else None
    for k in ("rec", "nll") + (("elbo", "kl") if objective == "elbo" else ()):
        assert b[k] == a[k]
    added = 784 * (3.0 * b["ffl"] + 0.5 * b["watson"])
    torch.testing.assert_close(b["loss"] - a["loss"], added, rtol=1e-4, atol=1e-3)
    assert b["ffl"] > 0 and b["watson"] > 0 and "ffl" not in a
    if x_hat is not None:
        torch.testing.assert_close(b["ffl"], FocalFrequency((1, 28, 28), LossConfig())(x, x_hat).mean())


def test_the_terms_are_not_trained_nor_saved():
    vae = vae_with(watson_dft=1.0, ms_ssim=1.0)
    assert not any(k.startswith("perceptual") for k in vae.state_dict())
    assert not any(n.startswith("perceptual") for n, _ in vae.named_parameters())


@pytest.fixture(scope="module")
def sharp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sharp") / "run"
    train(run, "configs/mnist_sigma_vae.yaml", ["train.steps=3", "loss.focal_frequency=1", "loss.ms_ssim=1"])
    return run


def test_a_short_run_trains_with_a_term(sharp_run):
    rows = [json.loads(line) for line in (sharp_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert train_rows and all(r["ffl"] > 0 and 0 < r["ms_ssim"] < 1 for r in train_rows)
    assert (sharp_run / "model.safetensors").is_file()


def test_evaluate_reports_ssim_and_ms_ssim_of_reconstructions(sharp_run):
    import evaluate
    from conftest import cli

    res = cli(evaluate.main, ["--exp_dir", str(sharp_run), "--n_test", "100", "--metrics", "recon"])
    assert res.returncode == 0, res.stderr[-2000:]
    recon = json.loads((sharp_run / "eval.json").read_text())["recon"]
    assert set(recon) == {"mse", "psnr", "ssim", "ms_ssim", "ms_ssim_scales"}
    assert recon["ms_ssim_scales"] == 2 and 0 < recon["ssim"] < 1 and 0 < recon["ms_ssim"] < 1  # 28 px: 2 scales
    assert f"SSIM {recon['ssim']:.4f}, MS-SSIM {recon['ms_ssim']:.4f} (2 scales)" in res.stdout


def test_an_inference_model_builds_no_terms_so_needs_no_lpips_file():
    from utils.config import config_to_dict, load_config
    from utils.inference.trained import TrainedVAE

    cfg = load_config(None, ["loss.lpips=1", "loss.lpips_weights=/gone/vgg16-397923af.pth", "model.hidden=8"])
    vae = TrainedVAE(config_to_dict(cfg), [1, 28, 28])
    assert not vae.perceptual.terms and vae.perceptual(torch.zeros(1, 1, 28, 28), None)[1] == {}


@pytest.mark.parametrize("args, needle", [
    (["loss.lpips=1"], "loss.lpips_weights=PATH"),
    (["loss.objective=iwae", "loss.k=2", "loss.watson_dft=1"], "loss.objective=iwae"),
    (["loss.focal_frequency=-1"], "loss.focal_frequency"),
    (["loss.lpips=1", "loss.lpips_weights=/nonexistent/vgg.pth"], "not found"),
    (["loss.lpips=1", "loss.lpips_net=resnet", "loss.lpips_weights=x"], "loss.lpips_net"),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(args, needle, tmp_path):
    res = train_cli(["-c", str(REPO / "configs/mnist.yaml"), "-e", str(tmp_path / "run"), *FAST,
                     "train.steps=1", *args])
    assert res.returncode == 2 and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "run").exists()


# ---- LPIPS: a randomly initialised AlexNet saved here (never downloaded), checked against the formula ----

@pytest.fixture(scope="module")
def alex_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
             if k.startswith("features.")}
    path = tmp_path_factory.mktemp("lpips") / "alexnet.pth"
    torch.save(state, path)
    return path, state


def lpips_by_formula(x: torch.Tensor, x_hat: torch.Tensor, state: dict) -> torch.Tensor:
    """Zhang et al.'s distance written out: AlexNet's five ReLU outputs, unit-normalised over channels, squared
    difference weighted by torchmetrics' shipped linear heads, spatial mean, sum over stages."""
    import importlib.resources

    import torchvision

    net = torchvision.models.alexnet(weights=None).features
    net.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    heads = torch.load(importlib.resources.files("torchmetrics.functional.image") / "lpips_models" / "alex.pth",
                       map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    total = 0.0
    a, b = (2 * x_hat - 1 - shift) / scale, (2 * x - 1 - shift) / scale
    stage = 0
    for i, layer in enumerate(net):
        a, b = layer(a), layer(b)
        if i in (1, 4, 7, 9, 11):  # the ReLUs
            na = a / torch.sqrt(1e-8 + (a ** 2).sum(1, keepdim=True))
            nb = b / torch.sqrt(1e-8 + (b ** 2).sum(1, keepdim=True))
            w = heads[f"lin{stage}.model.1.weight"]
            total = total + torch.nn.functional.conv2d((na - nb) ** 2, w).mean((2, 3)).view(-1)
            stage += 1
    return total


def test_lpips_with_user_weights_matches_the_formula_and_has_a_gradient(alex_file):
    path, state = alex_file
    term = TERMS["lpips"]((3, 64, 64), LossConfig(lpips=1, lpips_net="alex", lpips_weights=str(path)))
    x, x_hat = rand_pair((2, 3, 64, 64))
    x_hat = x_hat.requires_grad_()
    got = term(x, x_hat)
    torch.testing.assert_close(got, lpips_by_formula(x, x_hat.detach(), state), rtol=1e-4, atol=1e-6)
    got.sum().backward()
    assert x_hat.grad.abs().sum() > 0
    assert term(x, x.clone()).abs().max() < 1e-6
    grey = TERMS["lpips"]((1, 64, 64), LossConfig(lpips=1, lpips_net="alex", lpips_weights=str(path)))
    torch.testing.assert_close(grey(x[:, :1], x_hat[:, :1]), term(x[:, :1].expand(-1, 3, -1, -1),
                                                               x_hat[:, :1].expand(-1, 3, -1, -1)))
    p = Perceptual(LossConfig(lpips=1, lpips_net="alex", lpips_weights=str(path)), (3, 64, 64))
    assert not list(p.parameters()) and not p.state_dict()  # the backbone is not trained nor saved


def test_lpips_refuses_wrong_or_unsafe_weights(alex_file, tmp_path):
    from utils.errors import UserError

    path, _ = alex_file
    with pytest.raises(UserError, match="is not torchvision's vgg16"):
        TERMS["lpips"]((3, 64, 64), LossConfig(lpips=1, lpips_net="vgg", lpips_weights=str(path)))
    (tmp_path / "junk.pth").write_bytes(path.read_bytes()[:4000])  # cut short
    with pytest.raises(UserError, match="is not a torch weights file"):
        TERMS["lpips"]((3, 64, 64), LossConfig(lpips=1, lpips_net="alex", lpips_weights=str(tmp_path / "junk.pth")))
    torch.save({"features.0.weight": torch.zeros(1), "code": object()}, tmp_path / "pickle.pth")
    with pytest.raises(UserError, match="holds more than tensors"):
        TERMS["lpips"]((3, 64, 64), LossConfig(lpips=1, lpips_net="alex", lpips_weights=str(tmp_path / "pickle.pth")))
    for bad, said in (("a" * 300, "cannot be read"), ("nul\0char", "not found")):
        with pytest.raises(UserError, match=said):
            TERMS["lpips"]((3, 64, 64), LossConfig(lpips=1, lpips_net="alex", lpips_weights=bad))
    with pytest.raises(UserError, match="cannot take 28x28"):
        TERMS["lpips"]((1, 28, 28), LossConfig(lpips=1, lpips_net="alex", lpips_weights=str(path)))


