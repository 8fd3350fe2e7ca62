"""The image discriminator (models/discriminator.py): its losses and adaptive weight against taming-transformers'
``LPIPSWithDiscriminator`` formulas written out here on the same inputs, its geometry, the start step, exact
resume, DDP, and the refusals."""

from __future__ import annotations

import math
import types

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import CPU, REPO, accel_2, run_script, train, train_cli
from models import discriminator as d
from models.vae import VAE
from utils.config import load_config
from utils.errors import UserError
from utils.training.run_folder import read_metrics

ONE = types.SimpleNamespace(num_processes=1)
REAL = [2.0, 0.5, -0.25, 1.0, -3.0, 0.0]
FAKE = [-2.0, 0.75, 1.5, -1.0, 0.25, -0.5]
DISC = ["loss.disc_weight=0.8", "loss.disc_layers=1", "loss.disc_channels=8"]


def test_hinge_and_non_saturating_losses_by_hand():
    """taming's hinge_d_loss: ½ (mean relu(1 − real) + mean relu(1 + fake)); vanilla_d_loss:
    ½ (mean softplus(−real) + mean softplus(fake)); here in plain Python on the same logits."""
    real, fake = torch.tensor(REAL).view(1, 1, 2, 3), torch.tensor(FAKE).view(1, 1, 2, 3)
    hinge = 0.5 * (sum(max(0.0, 1 - r) for r in REAL) / 6 + sum(max(0.0, 1 + f) for f in FAKE) / 6)
    assert hinge == pytest.approx(0.5 * ((0 + 0.5 + 1.25 + 0 + 4 + 1) / 6 + (0 + 1.75 + 2.5 + 0 + 1.25 + 0.5) / 6))
    assert d.hinge_loss(real, fake).item() == pytest.approx(hinge, rel=1e-6)
    vanilla = 0.5 * (sum(math.log1p(math.exp(-r)) for r in REAL) / 6 + sum(math.log1p(math.exp(f)) for f in FAKE) / 6)
    assert d.non_saturating_loss(real, fake).item() == pytest.approx(vanilla, rel=1e-6)


def test_adaptive_weight_by_hand():
    """A last layer w (1 x 3) on a fixed feature h: rec = (w·h − t)², ∇_w rec = 2 (w·h − t) h; g = −a (w·h),
    ∇_w g = −a h. λ = weight · ‖∇rec‖ / (‖∇g‖ + 1e-4), clamped to [0, 1e4] (taming's calculate_adaptive_weight)."""
    h, t, a = [0.5, -1.0, 2.0], 3.0, 0.7
    w = nn.Parameter(torch.tensor([[0.2, 0.1, -0.4]]))
    out = w @ torch.tensor(h)
    rec, g = (out - t).pow(2).sum(), -a * out.sum()
    wh = 0.2 * 0.5 - 0.1 - 0.8
    norm_h = math.sqrt(0.25 + 1 + 4)
    expected = 0.8 * abs(2 * (wh - t)) * norm_h / (a * norm_h + 1e-4)
    lam = d.adaptive_weight(rec, g, w, 0.8)
    assert lam.item() == pytest.approx(expected, rel=1e-6) and not lam.requires_grad
    assert lam.dtype == torch.float32
    # no gradient from the adversarial term: the clamp at 1e4 (times the weight)
    flat = w.sum() * 0
    assert d.adaptive_weight(rec, flat, w, 0.8).item() == pytest.approx(0.8 * 1e4)
    # a non-finite gradient gives 0, not NaN
    assert d.adaptive_weight(rec * float("nan"), g, w, 0.8).item() == 0.0


def test_the_patch_is_the_receptive_field():
    """One logit of a 3-layer PatchGAN (norms aside, which see the whole map) depends on a 70x70 patch, the
    paper's; 1 layer: 16; a 28x28 image gives the 3-layer one a single logit."""
    assert [d.receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]
    for n in (1, 3):
        net = d.PatchGAN(1, 4, n)
        net.net = nn.Sequential(*[nn.Identity() if isinstance(m, nn.GroupNorm) else m for m in net.net])
        x = torch.randn(1, 1, 96, 96, requires_grad=True)
        logits = net(x)
        logits[0, 0, logits.shape[2] // 2, logits.shape[3] // 2].backward()
        rows = x.grad[0, 0].abs().sum(1).nonzero()
        assert rows.max() - rows.min() + 1 == d.receptive_field(n)
    assert d.PatchGAN(1, 4, 3)(torch.zeros(1, 1, 28, 28)).shape == (1, 1, 1, 1)


def models(extra: list[str]) -> tuple[VAE, VAE]:
    """A plain VAE and one with a discriminator, with the same weights where they share them."""
    keys = ["model.net=mlp", "model.hidden=[32]", "model.z_dim=4"]
    cfg, disc = load_config(None, keys), load_config(None, keys + DISC + extra)
    torch.manual_seed(0)
    plain = VAE(cfg.model, cfg.loss, (1, 16, 16))
    with_disc = VAE(disc.model, disc.loss, (1, 16, 16))
    with_disc.load_state_dict(plain.state_dict(), strict=False)
    return plain, with_disc


def test_off_before_the_start_step_then_on():
    """Before loss.disc_start the loss and the decoder's gradient are the plain ELBO's, bit for bit, and the
    discriminator does not step; from it, the term is added and the discriminator trains."""
    plain, vae = models(["loss.disc_start=5"])
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, vae):
        torch.manual_seed(3)
        terms = model(x, 4)
        terms["loss"].backward()
        results.append((terms["loss"].detach(), model.decoder.last_layer.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    before = [p.detach().clone() for p in vae.discriminator.parameters()]
    assert vae.after_step(ONE, torch.zeros(())) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, vae.discriminator.parameters()))
    assert not vae.discriminator.state_tensors()
    torch.manual_seed(3)
    terms = vae(x, 5)
    assert terms["d_weight"] > 0
    assert terms["loss"].item() == pytest.approx((terms["rec"] + terms["kl"] + terms["d_weight"] * terms["g_adv"])
                                                 .item(), rel=1e-6)
    logged = vae.after_step(ONE, torch.zeros(()))
    assert set(logged) == {"disc_loss", "logits_real", "logits_fake"}
    assert any(not torch.equal(a, b) for a, b in zip(before, vae.discriminator.parameters()))
    # a step the VAE skipped is skipped by the discriminator too
    vae(x, 6)
    moved = [p.detach().clone() for p in vae.discriminator.parameters()]
    vae.after_step(ONE, torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(moved, vae.discriminator.parameters()))
    # evaluation: the likelihood's terms alone, no adversarial term in the bound
    vae.eval()
    with torch.no_grad():
        assert "g_adv" not in vae(x, None)


def test_the_weight_is_fp32_and_finite_under_bf16_autocast():
    _, vae = models([])
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = vae(x, 0)
    assert terms["d_weight"].dtype == torch.float32 and torch.isfinite(terms["d_weight"]) and terms["d_weight"] > 0
    assert torch.isfinite(terms["loss"])


def test_state_round_trips_and_is_not_trained_by_the_vae_optimizer():
    _, vae = models([])
    x = torch.rand(8, 1, 16, 16)
    vae(x, 0)
    vae.after_step(ONE, torch.zeros(()))
    state = vae.discriminator.state_tensors()
    assert {k.split(".", 1)[1] for k in state} == {"step", "exp_avg", "exp_avg_sq"}
    _, other = models([])
    other.discriminator.load_state_tensors(state)
    assert other.discriminator.state_tensors().keys() == state.keys()
    assert all(torch.equal(other.discriminator.state_tensors()[k], v) for k, v in state.items())
    own = {id(p) for p in vae.discriminator.parameters()}
    assert own.isdisjoint({id(p) for p in vae.trained_parameters()})
    assert list(vae.critics()) == ["discriminator.safetensors"]


def test_resume_equals_unbroken_run(tmp_path, real_data):
    extra = ["model.hidden=[64]", "model.z_dim=4", *DISC, "loss.disc_start=2", "train.save_every=3",
             "train.steps=6"]
    train(tmp_path / "full", extra=extra)
    train(tmp_path / "part", extra=[*extra, "train.steps=3"])
    res = train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=6"])
    assert res.returncode == 0, res.stderr[-2000:]
    full, part = read_metrics(tmp_path / "full", "train"), read_metrics(tmp_path / "part", "train")
    assert [r["loss"] for r in full] == [r["loss"] for r in part]
    assert [r.get("disc_loss") for r in full] == [r.get("disc_loss") for r in part] and "disc_loss" in full[-1]
    for name in ("model.safetensors", "checkpoints/step_0000006/discriminator.safetensors"):
        wa, wb = load_file(tmp_path / "full" / name), load_file(tmp_path / "part" / name)
        assert wa and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.startswith("discriminator.net.") for k in load_file(tmp_path / "full" / "model.safetensors"))


def test_ddp_keeps_the_discriminators_and_the_weight_the_same(real_data):
    p = run_script([str(REPO / "tests" / "ddp_discriminator.py")], launcher=accel_2(), env=CPU)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "processes=2 same=True moved=True weight_same=True weight_global=True" in p.stdout


@pytest.mark.parametrize("keys, says", [
    (["loss.disc_weight=0.5"], "loss.disc_layers=3 gives the discriminator 70x70 px patches, larger than the 28x28 "
                               "images, so it would judge whole padded images, not patches: use "
                               "loss.disc_layers=1 (16 px patches) or larger images"),
    (["loss.disc_weight=0.5", "loss.objective=iwae", "loss.k=2"], "loss.objective=iwae trains a bound on log p(x)"),
])
def test_refused_in_one_line_with_nothing_written(keys, says, tmp_path, real_data):
    run = tmp_path / "run"
    res = train_cli(["-c", str(REPO / "configs/mnist.yaml"), "-e", str(run), "data.root=" + str(real_data), *keys])
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and says in res.stderr
    assert not run.exists()


def test_a_decoder_without_a_last_layer_is_refused():
    loss = load_config(None, DISC).loss
    with pytest.raises(UserError, match="the Identity does not name one"):
        d.build_discriminator(loss, (1, 28, 28), nn.Identity())
    assert d.build_discriminator(load_config(None, []).loss, (1, 28, 28), nn.Identity()) is None


def test_the_model_card_names_the_terms_that_trained_the_decoder():
    from utils.config import config_to_dict, load_config
    from utils.inference import TrainedVAE

    def card(overrides: list[str]) -> str:
        cfg = config_to_dict(load_config(None, overrides))
        return str(TrainedVAE(cfg, [1, 28, 28]).generate_model_card())

    terms = card(["loss.focal_frequency=10", "loss.disc_weight=0.5", "loss.disc_start=7", "loss.disc_layers=1"])
    assert ("trained on focal_frequency (weight 10), a PatchGAN discriminator (hinge loss, weight 0.5 times the "
            "adaptive weight, from step 7)") in terms and "no part of log p(x)" in terms
    assert "also trained on" not in card([])
