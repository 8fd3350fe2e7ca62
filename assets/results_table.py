"""Print the Results tables of docs/results.md from the eval JSONs that assets/make_results.sh wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.inference import compare  # noqa: E402  (the repository's root is put on the path first)

HERE = Path(__file__).parent / "results"
LIKELIHOODS = ["mse", "gaussian", "sigma", "optimal_sigma", "per_pixel_sigma"]


def load(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def sigma_table(data: str) -> str:
    rows = ["| decoder | test ELBO (bits/dim) | NLL, IWAE k=100 (bits/dim) | KL (nats) | active units | "
            "MSE | samples |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for lik in LIKELIHOODS:
        r = load(f"{data}-{lik}")
        b = r["nll"]
        rows.append(f"| `{lik}` | {b['elbo_bpd']:.3f} | {b['nll_bpd']:.3f} | {b['kl']:.1f} | "
                    f"{r['au']['active_units']}/{r['au']['z_dim']} | {r['recon']['mse']:.4f} | "
                    f"![](assets/results/{data}-{lik}/samples.png) |")
    return "\n".join(rows)


def beta_table() -> str:
    rows = ["| β | β-VAE metric | FactorVAE metric | MIG | test ELBO (nats) | KL (nats) | active units | "
            "traversal (rows: dimensions by KL) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for beta in (1, 4, 16):
        r = load(f"dsprites-beta{beta}")
        d, b = r["disentanglement"], r["nll"]
        rows.append(f"| {beta} | {d['beta_vae']['eval_accuracy']:.3f} | {d['factor_vae']['eval_accuracy']:.3f} | "
                    f"{d['mig']['mig']:.3f} | {b['elbo']:.1f} | {b['kl']:.1f} | "
                    f"{r['au']['active_units']}/{r['au']['z_dim']} | "
                    f"![](assets/results/dsprites-beta{beta}/traverse.png) |")
    return "\n".join(rows)


# (config, what the published figure is, where it is printed, nats)
PUBLISHED = {
    "vae": ("784-200-200-50 tanh, ELBO", "VAE, one stochastic layer", "Burda et al. 2016, Table 1, k = 1", 86.76),
    "iwae": ("784-200-200-50 tanh, IWAE k = 50", "IWAE, one stochastic layer", "Burda et al. 2016, Table 1, k = 50",
             84.78),
    "vamp": ("784-300-300-40 tanh, VampPrior (500 pseudo-inputs), ELBO", "VAE + VampPrior, one stochastic layer",
             "Tomczak & Welling 2018, as quoted by pythae's reproduction", 85.57),
    "vamp_ema": ("as `vamp`, with a moving average of the weights (decay 0.999)",
                 "VAE + VampPrior, one stochastic layer", "Tomczak & Welling 2018, as quoted by pythae's reproduction",
                 85.57),
    "hvae": ("Ladder VAE, 784-200-200-100 / 100-100-50 ReLU (two stochastic layers), ELBO with KL warm-up",
             "VAE, two stochastic layers", "Burda et al. 2016, Table 1, k = 1", 85.33),
    "hvae_iw": ("as `hvae`, then 10,000 steps of the IWAE bound (k = 10) at its annealed learning rate",
                "IWAE, two stochastic layers", "Burda et al. 2016, Table 1, k = 50", 82.90),
}


def binarized() -> str:
    rows = ["| row | model | NLL, IWAE k = 5000 (nats) | −ELBO (nats) | active units | published | samples |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for row, (model, what, where, nats) in PUBLISHED.items():
        if not (HERE / f"binarized-mnist-{row}.json").is_file():
            continue
        r = load(f"binarized-mnist-{row}")
        au = r["au"].get("layers") or [r["au"]]  # a ladder's per layer, bottom first
        units = ", ".join(f"{a['active_units']}/{a['z_dim']}" + (f" in z_{i + 1}" if len(au) > 1 else "")
                          for i, a in enumerate(au))
        rows.append(f"| `{row}` | {model} | **{r['nll']['nll']:.2f}** | {-r['elbo']['elbo']:.2f} | "
                    f"{units} | {nats:.2f} ({what}; {where}) | "
                    f"![](assets/results/binarized-mnist-{row}/samples.png) |")
    b = load("binarized-mnist")["nll"]
    rows.append(f"| default | `configs/mnist.yaml` + `data.binarize=true` (MLP 784-400-16, 10,000 steps, k = 1000) | "
                f"{b['nll']:.2f} | {-b['elbo']:.2f} | | | |")
    return "\n".join(rows)


STUDY = {"vae": "VAE (β = 1)", "beta_vae": "β-VAE (β = 4)", "tcvae": "β-TCVAE (β = 6)",
         "factor_vae": "FactorVAE (γ = 35)", "dip_vae": "DIP-VAE-I (λ_od = 5, λ_d = 50)"}


def study_table() -> str:
    rows = ["| model | β-VAE metric | FactorVAE metric | MIG | DCI disentanglement | SAP | test ELBO (nats) | "
            "KL (nats) | active units |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, name in STUDY.items():
        if not (HERE / f"dsprites-study-{row}.json").is_file():
            continue
        r = load(f"dsprites-study-{row}")
        d, b = r["disentanglement"], r["nll"]
        rows.append(f"| {name} | {d['beta_vae']['eval_accuracy']:.3f} | {d['factor_vae']['eval_accuracy']:.3f} | "
                    f"{d['mig']['mig']:.3f} | {d['dci']['disentanglement']:.3f} | {d['sap']['sap']:.3f} | "
                    f"{b['elbo']:.1f} | {b['kl']:.1f} | {r['au']['active_units']}/{r['au']['z_dim']} |")
    return "\n".join(rows)


def study_trajectory() -> str:
    """The same scores of each study run at its step-1000 checkpoint and at the end (step 2000)."""
    rows = ["| model | β-VAE metric | FactorVAE metric | MIG | DCI disentanglement | SAP |",
            "| --- | --- | --- | --- | --- | --- |"]
    keys = [("beta_vae", "eval_accuracy"), ("factor_vae", "eval_accuracy"), ("mig", "mig"),
            ("dci", "disentanglement"), ("sap", "sap")]
    for row, name in STUDY.items():
        if not (HERE / f"dsprites-study-{row}-step1000.json").is_file():
            continue
        early = load(f"dsprites-study-{row}-step1000")["disentanglement"]
        late = load(f"dsprites-study-{row}")["disentanglement"]
        cells = [f"{early[a][b]:.3f} → {late[a][b]:.3f}" for a, b in keys]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# the families of assets/make_quality.sh: what each changes in the data set's base (Bernoulli decoder)
FAMILIES = {"vae": "VAE", "beta_vae": "β-VAE (β = 4)", "mmd_vae": "MMD-VAE", "sigma_vae": "σ-VAE (optimal σ)",
            "ae": "AE", "aae": "AAE"}
SAMPLERS = ("prior", "gmm", "two_stage")
RANKED = ("sigma_vae", "ae")  # the families whose codes every sampler, flows included, was fitted to
FLOWS = ("flow", "flow_matching")


def quality_table(data: str, families: tuple[str, ...] = tuple(FAMILIES), samplers: tuple[str, ...] = SAMPLERS) -> str:
    """Each family's samples from each sampler, beside the floor, in the data set's feature network."""
    entries = [("real training images (the floor)", load(f"quality-{data}-floor")["quality"])]
    entries += [(f"{FAMILIES[fam]}, `{s}`", load(f"quality-{data}-{fam}-{s}")["quality"]) for fam in families
                for s in samplers if (HERE / f"quality-{data}-{fam}-{s}.json").is_file()]
    return compare.quality_table(entries, "against the held-out images")


def recon_quality_table(data: str) -> str:
    """Each family's reconstructions of the held-out images, beside the floor."""
    entries = [("real training images (the floor)", load(f"quality-{data}-floor")["quality"])]
    entries += [(f"{name}, reconstructions", load(f"quality-{data}-{fam}-recon")["recon_quality"])
                for fam, name in FAMILIES.items() if (HERE / f"quality-{data}-{fam}-recon.json").is_file()]
    return compare.quality_table(entries, "against the held-out images")


# the rows of assets/make_sharp.sh: one budget (1,000 steps at batch 32) on the shared faces
SHARP = {"sigma": "σ-VAE as shipped (`celeba_sigma_vae.yaml`: conv, z = 128, learned σ)",
         "focal": "+ focal frequency, weight 10 (`celeba_sigma_vae_perceptual.yaml`)",
         "watson": "+ Watson-DFT, weight 0.001",
         "patchgan": "+ PatchGAN (hinge, weight 0.5 × the adaptive weight, from step 500, 34-px patches)",
         "klae": "KL autoencoder (`celeba_klae.yaml`: 4×16×16 latents, β = 1e-6, focal frequency 10, PatchGAN "
                 "from step 500)",
         "klae_nogan": "the same KL autoencoder without its PatchGAN (`loss.disc_weight=0`)"}


def sharp_table() -> str:
    """Each row's bound, its reconstructions' PSNR, SSIM and MS-SSIM and their scores in the faces' feature
    network, and its gmm samples' scores where the latent is flat; the floor last."""
    rows = ["| row | −ELBO (nats) | PSNR (dB) | SSIM | MS-SSIM | reconstructions: FD ↓ | precision | recall | "
            "coverage | gmm samples: FD ↓ | coverage |", "| --- | " + "--- | " * 10]
    for row, name in SHARP.items():
        if not (HERE / f"sharp-{row}.json").is_file():
            continue
        r = load(f"sharp-{row}")
        e, q = r["recon"], r["recon_quality"]
        g = load(f"sharp-{row}-gmm")["quality"] if (HERE / f"sharp-{row}-gmm.json").is_file() else None
        samples = f"{g['fd']:.3f} | {g['coverage']:.2f}" if g else "(spatial latents) | "
        rows.append(f"| {name} | {-r['elbo']['elbo']:,.0f} | {e['psnr']:.2f} | {e['ssim']:.3f} | {e['ms_ssim']:.3f} | "
                    f"{q['fd']:.3f} | {q['precision']:.2f} | {q['recall']:.2f} | {q['coverage']:.2f} | {samples} |")
    f = load("quality-celeba-floor")["quality"]
    rows.append(f"| real training faces (the floor) | | | | | {f['fd']:.3f} | {f['precision']:.2f} | "
                f"{f['recall']:.2f} | {f['coverage']:.2f} | {f['fd']:.3f} | {f['coverage']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    for data in ("mnist", "fashion_mnist", "celeba"):
        if (HERE / f"quality-{data}-floor.json").is_file():
            print(f"\n{data}\n\n{quality_table(data)}\n\n{recon_quality_table(data)}\n\n"
                  f"{quality_table(data, RANKED, SAMPLERS + FLOWS)}")
    for data in ("mnist", "fashion_mnist"):
        print(f"\n{data}\n\n{sigma_table(data)}")
    print(f"\n{sharp_table()}")
    print(f"\n{beta_table()}\n\n{binarized()}\n\n{study_table()}\n\n{study_trajectory()}")
