"""Training speed on a quiet and on a busy CPU, for several thread settings.

    python benchmarks/threads.py --data_root ../shared/data [--configs mnist,celeba] [--repeats 3]

Each setting trains ``train_vae.py`` as a user runs it (a fresh process; steps/s from its metrics.jsonl, the
median window after ``--warmup`` steps), once on a quiet machine and once beside a competing load that this
script starts itself: ``--load_procs`` processes that each keep one core busy (a pure-Python loop, as another
user's job would). The settings, as environment variables of the training process:

    old default   OMP_NUM_THREADS=<PyTorch's count, one per core>: a fixed team whose waits spin (GNU OpenMP's
                  own policy), as the trainer ran before it adapted its count
    new default   nothing set: the trainer's choice (utils/threads.py: the spin kept, one thread fewer per
                  core that other processes hold, checked each second)
    1 thread      OMP_NUM_THREADS=1
    passive       OMP_NUM_THREADS=<one per core> OMP_WAIT_POLICY=PASSIVE: a fixed team whose waits sleep

Runs alternate between the settings and the loads (``--repeats`` rounds), so a slow spell of a shared machine
hits all of them; the table gives the median and the range, and each setting's ratio to the best setting under
the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from throughput import cpu_model, trainer  # noqa: E402


def settings_of(per_core: int) -> dict[str, dict[str, str]]:
    """The compared settings (module docstring), for a machine where PyTorch runs ``per_core`` threads."""
    n = str(per_core)
    return {"old default": {"OMP_NUM_THREADS": n}, "new default": {}, "1 thread": {"OMP_NUM_THREADS": "1"},
            "passive": {"OMP_NUM_THREADS": n, "OMP_WAIT_POLICY": "PASSIVE"}}


CONFIGS = {  # name: (config, overrides that point it at the data and keep a run short)
    "mnist": ("configs/mnist.yaml", ["data.root={root}", "data.download=false"]),
    "celeba": ("configs/celeba.yaml", ["data.root={root}/celeba-10k", "data.download=false",
                                       "train.eval_samples=64"]),
}
POLICY_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


class Load:
    """``n`` processes that each keep a core busy, for the duration of a ``with`` block."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self) -> Load:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def run(config: str, overrides: list[str], steps: int, window: int, warmup: int, env: dict[str, str]) -> float:
    """steps/s of one training run with ``env`` (and none of the user's own thread settings)."""
    saved = {k: os.environ.pop(k) for k in POLICY_KEYS if k in os.environ}
    os.environ.update(env)
    try:
        r = trainer(str(REPO / config), overrides, steps, window)
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)
    return statistics.median(r["windows"][warmup // window:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default="data", help="the folder holding MNIST/raw and celeba-10k/")
    p.add_argument("--configs", default="mnist,celeba", help=f"comma-separated, from {','.join(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (median reported)")
    p.add_argument("--load_procs", type=int, default=1, help="busy processes of the competing load")
    p.add_argument("--mnist_steps", type=int, default=1600)
    p.add_argument("--celeba_steps", type=int, default=24)
    p.add_argument("--settings", help="extra settings to compare, as NAME=VAR=VALUE;... (e.g. 'spin 10k="
                                      "GOMP_SPINCOUNT=10000')")
    args = p.parse_args()
    import torch

    settings = settings_of(torch.get_num_threads())
    for item in filter(None, (args.settings or "").split(";")):
        name, var, value = item.split("=", 2)
        settings[name] = {var: value}
    names = [c.strip() for c in args.configs.split(",")]
    for c in names:
        if c not in CONFIGS:
            sys.exit(f"error: unknown config {c}: choose from {','.join(CONFIGS)}")
    results: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(args.repeats):
        for c in names:
            config, extra = CONFIGS[c]
            steps = args.mnist_steps if c == "mnist" else args.celeba_steps
            window = max(1, steps // 10)
            overrides = [o.format(root=args.data_root) for o in extra]
            for load in ("quiet", "busy"):
                for name, env in settings.items():
                    with Load(args.load_procs if load == "busy" else 0):
                        sps = run(config, overrides, steps, window, steps // 4, env)
                    results.setdefault((c, load, name), []).append(sps)
                    print(f"round {rep + 1}: {c} {load} {name}: {sps:.2f} steps/s", file=sys.stderr, flush=True)

    print(f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; busy = {args.load_procs} competing "
          f"busy process(es); median of {args.repeats} alternating runs [min-max]; ratio = the best setting's "
          f"steps/s under the same load divided by this one's\n")
    print(table(results))


def table(results: dict[tuple[str, str, str], list[float]]) -> str:
    """The markdown table of (config, load, setting) -> steps/s of each round, in the order first seen."""
    rows = ["| config | load | setting | steps/s | ratio to best |", "| --- | --- | --- | --- | --- |"]
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for (c, load, name), v in results.items():
        groups.setdefault((c, load), {})[name] = v
    for (c, load), by_setting in groups.items():
        medians = {n: statistics.median(v) for n, v in by_setting.items()}
        best = max(medians.values())
        for n, v in by_setting.items():
            rows.append(f"| {c} | {load} | {n} | {medians[n]:.2f} [{min(v):.2f}-{max(v):.2f}] | "
                        f"{best / medians[n]:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
