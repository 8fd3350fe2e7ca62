"""Time to fit each ex-post sampler to a run's training codes and to draw 10,000 codes from it, on this machine.

    python benchmarks/samplers.py --exp_dir RUN [--samplers gmm,two_stage,flow,flow_matching] [--n 10000]
        [--threads 1]

Each sampler is fitted with its default options to the training set's codes (what ``sample.py --sampler NAME``
fits and keeps in the run's folder; nothing is kept here), then draws n codes from a seeded CPU generator.
Prints a markdown table. The encoding of the training set, shared by every sampler, is timed on its own line.
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
    p.add_argument("--exp_dir", required=True, help="a trained run")
    p.add_argument("--samplers", default="gmm,two_stage,flow,flow_matching")
    p.add_argument("--n", type=int, default=10_000, help="codes drawn")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch

    from models.sampler_rules import SAMPLERS, SamplerOptions
    from utils.data.registry import load_data
    from utils.evaluation.samplers import training_codes
    from utils.inference import TrainedVAE

    torch.set_num_threads(a.threads)
    vae = TrainedVAE.load(a.exp_dir)
    train, _, _ = load_data(vae.config.data)
    t0 = time.perf_counter()
    means, stds = training_codes(vae, train)
    encode = time.perf_counter() - t0
    print(f"{a.exp_dir}: {len(means)} training codes of {means.shape[1]} dimensions, {a.threads} thread(s)\n")
    print(f"| sampler | fit (s) | draw {a.n:,} codes (s) |\n| --- | --- | --- |")
    print(f"| (encoding the training set, shared) | {encode:.1f} | |")
    for name in a.samplers.split(","):
        t0 = time.perf_counter()
        sampler = SAMPLERS[name].load()().fit(means, SamplerOptions(), stds)
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        sampler.sample(a.n, torch.Generator().manual_seed(0))
        print(f"| `{name}` | {fit:.1f} | {time.perf_counter() - t0:.2f} |", flush=True)


if __name__ == "__main__":
    main()
