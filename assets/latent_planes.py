"""Plot trained models' 2-D latent planes side by side: each test image's code (the posterior mean; an
autoencoder's code) as a point coloured by its digit, with N(0, I)'s 1, 2 and 3 standard-deviation circles.

    python assets/latent_planes.py runs/plane-ae runs/plane-vae ... --out assets/latent_planes.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.data.registry import load_data  # noqa: E402
from utils.evaluation.latents import posterior_stats  # noqa: E402
from utils.inference import TrainedVAE  # noqa: E402

TITLES = {"none": "AE", "kl": "VAE", "aae": "AAE", "mmd": "MMD-VAE"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+")
    p.add_argument("--data_root")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.runs), figsize=(4.2 * len(args.runs), 4.4), dpi=100)
    for ax, run in zip(axes, args.runs):
        vae = TrainedVAE.load(run)
        if args.data_root:
            vae.config.data.root = args.data_root
        test = load_data(vae.config.data)[1]
        codes, labels = posterior_stats(vae, test)[0], test.labels.cpu()
        for c in range(10):
            sel = labels == c
            ax.scatter(codes[sel, 0], codes[sel, 1], s=1.5, alpha=0.5, color=plt.cm.tab10(c), label=str(c))
        for r in (1, 2, 3):
            ax.add_patch(plt.Circle((0, 0), r, fill=False, lw=0.6, ls="--", color="black"))
        lim = max(4.0, float(codes.abs().quantile(0.99)))
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[],
               title=f"{TITLES.get(vae.config.loss.regulariser, run)} ({Path(run).name})")
    axes[-1].legend(title="digit", markerscale=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
