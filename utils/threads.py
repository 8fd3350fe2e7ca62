"""CPU threads that hold up when the cores are shared.

PyTorch's CPU kernels run on an OpenMP team, one thread per core. GNU OpenMP (the runtime of PyTorch's Linux
wheels) lets a thread that reaches the end of a parallel region spin for up to 300,000 iterations before it
sleeps, waiting for its siblings. When another job holds one of the cores, a sibling is descheduled and the
spinning thread burns the time slice the sibling needed: each of the hundreds of small parallel regions of a
step then waits a scheduler tick, and a step becomes 10 to 40 times slower (benchmarks/threads.py measures it).
A thread that sleeps at once (``OMP_WAIT_POLICY=PASSIVE``) gives its core back, so the team finishes as soon as
the cores allow, at a cost of a wake-up per region on an idle machine (benchmarks/README.md has the figures).

The policy is read once, when the OpenMP runtime loads with torch, so ``passive_wait`` must run before torch is
imported: each entry point imports this module first. A policy the user set (``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT``) is kept. The thread count is the user's to choose (``train.threads``, ``--threads``);
0 keeps PyTorch's own choice (``OMP_NUM_THREADS``, else one per core).

This module imports nothing of the toolkit's and does not import torch at load time.
"""

from __future__ import annotations

import os
import sys

from utils.errors import UserError

USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def passive_wait() -> bool:
    """Ask for sleeping, not spinning, OpenMP waits, unless the user chose a policy or torch is already loaded
    (then it is too late to matter). Whether the policy was set here."""
    if any(k in os.environ for k in USER_KEYS) or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def set_threads(n: int, what: str = "--threads") -> int:
    """Use ``n`` intra-op threads (0: PyTorch's own count); the count in use. ``what`` names the setting in an
    error."""
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"{what} must be 0 (OMP_NUM_THREADS, else one per core) or a positive whole number of "
                        f"threads, got {n!r}")
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def add_threads_argument(p) -> None:
    """sample.py's and evaluate.py's ``--threads`` (train_vae.py has ``train.threads``)."""
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch's kernels (default 0: "
                                                          "OMP_NUM_THREADS, else one per core)")


def wait_policy() -> str:
    """The OpenMP wait policy in effect, as the run line shows it."""
    if "GOMP_SPINCOUNT" in os.environ:
        return f"spin {os.environ['GOMP_SPINCOUNT']}"
    return os.environ.get("OMP_WAIT_POLICY", "default").lower()


passive_wait()
