"""Time of the sample-quality suite (``evaluate.py --metrics quality``): features of n real and n generated images,
then each score, on this machine.

    python benchmarks/quality.py -c configs/celeba.yaml --data_root ../shared/data/celeba-10k \
        --features features/celeba.safetensors [--exp_dir RUN] [--n 10000] [--threads 1]

Without ``--exp_dir`` the "generated" images are the last n training images: the scores are then the floor
(real held-out images against real training images: what a perfect model would score) and the table times
the features and the scores, the part a model does not change; with a run, its prior samples are decoded and
scored instead. ``--out FILE`` writes the scores as evaluate.py does (``utils.inference.compare`` reads it).
``--real train`` takes the real set from the first n training images, for a timing where the
held-out split is small (CelebA's 500 faces here; the two sets then share images). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--data_root")
    p.add_argument("--features", required=True, help="the data set's feature network (utils.inference.features)")
    p.add_argument("--exp_dir", help="a trained run: time its prior samples too")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kid_subset_size", type=int, help="images in each of KID's 100 subsets (default as evaluate.py)")
    p.add_argument("--real", choices=("test", "train"), default="test", help="the split of the real images")
    p.add_argument("--out", help="also write the scores as an eval.json's quality entry (for utils.inference.compare)")
    a = p.parse_args()

    import torch

    from utils.config import load_config
    from utils.data.registry import load_data
    from utils.evaluation import quality
    from utils.evaluation.features import load_feature_net

    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, [f"data.root={a.data_root}"] if a.data_root else [])
    times: list[tuple[str, float]] = []

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times.append((name, time.perf_counter() - t0))
        return out

    train, test, _ = timed("read the data", lambda: load_data(cfg.data))
    net = load_feature_net(a.features, tuple(train.shape))
    source = test if a.real == "test" else train
    n_real = min(a.n, len(source))
    real_images = timed(f"decode {n_real} {a.real} images", lambda: source.batch(torch.arange(n_real)))
    if a.exp_dir:
        from utils.inference.loading import load_trained

        _, vae, _, _ = load_trained(a.exp_dir, None, None, torch.device("cpu"), a.data_root)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            fake_images = timed(f"decode {a.n} prior samples", lambda: torch.cat(
                [vae.decode(vae.prior.sample(min(500, a.n - i), g)).clamp(0, 1) for i in range(0, a.n, 500)]))
    else:
        n_fake = min(a.n, len(train))
        fake_images = timed(f"decode {n_fake} training images",
                            lambda: train.batch(torch.arange(len(train) - n_fake, len(train))))
    real = timed(f"features of {len(real_images)} real", lambda: net.embed(real_images))
    fake = timed(f"features of {len(fake_images)} generated", lambda: net.embed(fake_images))
    r, g = quality.checked_pair(real, fake)
    fd = timed("Fréchet distance", lambda: quality.frechet_distance(r, g))
    size = min(quality.kid_subset_size(min(len(r), len(g)), a.kid_subset_size), len(r), len(g))
    kid = timed(f"KID (100 subsets of {size})", lambda: quality.kid(r, g, seed=0, subsets=100, subset_size=size))
    prdc = timed("precision, recall, density, coverage (k=3)", lambda: quality.prdc(r, g, nearest_k=3))
    c2st = timed("two-sample test", lambda: quality.c2st(r, g, seed=0))
    print(f"{cfg.data.name}, {'x'.join(map(str, train.shape))}, {net.identity}, {a.threads} thread(s)\n")
    print("| step | seconds |\n| --- | --- |")
    for name, s in times:
        print(f"| {name} | {s:.1f} |")
    print(f"| **all** | **{sum(s for _, s in times):.1f}** |")
    print(f"\nFD {fd:.3f}, KID {kid[0]:.4g} ± {kid[1]:.2g}, {', '.join(f'{k} {v:.3f}' for k, v in prdc.items())}, "
          f"two-sample accuracy {c2st[0]:.3f}")
    if a.out:
        import json

        scores = quality.quality_scores(real, fake, seed=0, kid_subsets=100, kid_subset_size=size)
        what = "prior samples" if a.exp_dir else "training images (the floor)"
        Path(a.out).write_text(json.dumps({"quality": {**scores, "features": net.identity, "sampler": what}}, indent=1))


if __name__ == "__main__":
    main()
