"""How soon the command-line tools answer: time to ``--help``, to a config error, to the first training step and
to the first sample image, beside ``python -c "import torch"`` measured in the same run.

    python benchmarks/startup.py --data_root ../shared/data [--repeats 5]

Each case is a fresh process, as a user starts it; the cases alternate over ``--repeats`` rounds, so a slow
spell of a shared machine hits all of them, and the table gives the median and the range. The first step is
the moment the trainer's metrics.jsonl holds its first training row (the MNIST quick start, logging every step);
the first image the moment sample.py's samples.png is written (whole: it is written under a temporary name
and renamed). Quiet the machine first: the numbers are wall-clock times.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from throughput import cpu_model  # noqa: E402


def timed(cmd: list[str], done: Callable[[], bool] | None = None, expect: int | None = 0) -> float:
    """Seconds from starting ``cmd`` to its exit, or to ``done()`` turning true (polled every 5 ms) when given.
    ``expect``: the exit code it must end with (None: any)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done is not None:
        while not done():
            if proc.poll() is not None and not done():
                break
            time.sleep(0.005)
        took = time.perf_counter() - t0
        out, err = proc.communicate()
    else:
        out, err = proc.communicate()
        took = time.perf_counter() - t0
    if expect is not None and proc.returncode != expect:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode} (expected {expect}):\n{err[-2000:]}")
    if done is not None and not done():
        raise SystemExit(f"{' '.join(cmd)} ended before it got there:\n{err[-2000:]}")
    return took


def first_train_row(metrics: Path) -> Callable[[], bool]:
    return lambda: metrics.is_file() and '"split": "train"' in metrics.read_text()


def cases(data_root: str, work: Path) -> dict[str, Callable[[int], float]]:
    """The measured cases by their table name; each takes the round's number (for fresh run folders)."""
    py = sys.executable
    train = [py, "train_vae.py", "-c", "configs/mnist.yaml", f"data.root={data_root}", "train.log_every=1",
             "train.steps=50", "train.eval_every=0", "train.sample_every=0", "train.save_every=0"]
    trained = work / "trained"

    def first_step(i: int) -> float:
        run = work / f"step{i}"
        return timed([*train, "-e", str(run)], first_train_row(run / "metrics.jsonl"))

    def first_image(i: int) -> float:
        out = work / f"sample{i}"
        return timed([py, "sample.py", "-e", str(trained), "--save_dir", str(out), "--n_samples", "16"],
                     lambda: (out / "samples.png").is_file())

    subprocess.run([*train, "-e", str(trained), "train.steps=5"], cwd=REPO, check=True, capture_output=True)
    return {
        'python -c "import torch"': lambda i: timed([py, "-c", "import torch"]),
        "train_vae.py --help": lambda i: timed([py, "train_vae.py", "--help"]),
        "sample.py --help": lambda i: timed([py, "sample.py", "--help"]),
        "evaluate.py --help": lambda i: timed([py, "evaluate.py", "--help"]),
        "sample.py --mode nonesuch (argument error)": lambda i: timed([py, "sample.py", "--mode", "nonesuch"],
                                                                     expect=2),
        "evaluate.py --k 0 (argument error)": lambda i: timed([py, "evaluate.py", "--k", "0"], expect=2),
        "train_vae.py loss.betta=4 (config key error)": lambda i: timed([*train, "loss.betta=4"], expect=2),
        "train_vae.py loss.regulariser=mmd (rule across parts)": lambda i: timed([*train, "loss.regulariser=mmd"],
                                                                                 expect=2),
        "train_vae.py --dry-run": lambda i: timed([*train, "--dry-run"]),
        "train_vae.py: first training step": first_step,
        "sample.py: first sample image": first_image,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default="../shared/data", help="where MNIST's raw files are (MNIST/raw)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        todo = cases(str(Path(a.data_root).resolve()), Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in todo}
        for i in range(a.repeats):
            for name, case in todo.items():
                times[name].append(case(i))
    torch_s = statistics.median(times['python -c "import torch"'])
    print(f"{cpu_model()}, {a.repeats} rounds; median (range), and the difference to importing torch\n")
    print("| case | seconds | minus `import torch` |")
    print("| --- | --- | --- |")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.2f} ({min(t):.2f}-{max(t):.2f}) | {med - torch_s:+.2f} |")


if __name__ == "__main__":
    main()
