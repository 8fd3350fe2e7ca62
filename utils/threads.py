"""CPU threads that hold up when the cores are shared.

PyTorch's CPU kernels run on an OpenMP team, one thread per core. GNU OpenMP (the runtime of PyTorch's Linux
wheels) lets a thread that reaches the end of a parallel region spin for a while (300,000 pause instructions,
milliseconds on current CPUs) before it sleeps, waiting for its siblings. On an idle machine that spin is what
makes the many small parallel regions of a small model's step fast. When another job holds one of the cores, a
sibling is descheduled, and the spinning thread burns the time slice that the sibling needed: every region then
waits for the scheduler, and a step becomes several times slower (benchmarks/threads.py measures both).

Two remedies, one per kind of entry point:

- Training (many small steps) keeps the spin and adapts the thread count to the cores that are free
  (``AdaptiveThreads``): once a second it reads how much CPU other processes used (``/proc/stat`` less this
  process and its children), and runs one thread fewer per core they hold, so no team waits on a core that is
  taken. ``train.threads`` (or ``OMP_NUM_THREADS``) fixes the count instead: a count that does not change keeps
  a run's arithmetic the same from step to step, where a changing count may reorder a sum.
- ``sample.py`` and ``evaluate.py`` (few, large operations) sleep instead of spinning (``passive_wait``, which
  must run before torch loads: ``utils/sleeping_waits.py``, imported first by those scripts); a wake-up costs
  little beside a large operation.

A policy the user set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is kept. This module does not import torch at
load time.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

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
    """Use ``n`` intra-op threads (0: PyTorch's own count, from OMP_NUM_THREADS or the cores); the count in use.
    ``what`` names the setting in an error."""
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
    return os.environ.get("OMP_WAIT_POLICY", "spin").lower()


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its live children), or None where
    the machine does not say (no /proc/stat). Busy includes the time a hypervisor took (steal): it is not ours."""
    import psutil

    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest time is inside user
    me = psutil.Process()
    own = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):  # DataLoader workers: their CPU is this run's too
        try:
            own += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return busy, own


class AdaptiveThreads:
    """One thread per core that other processes leave free, between 1 and ``most``, checked once per ``every``
    seconds; a new count is taken when two checks in a row ask for it (a passing burst changes nothing)."""

    def __init__(self, most: int, every: float = 1.0, read: Callable[[], tuple[float, float] | None] = cpu_seconds,
                 clock: Callable[[], float] = time.monotonic, apply: Callable[[int], None] | None = None,
                 cores: int | None = None):
        self.most, self.every, self.read, self.clock = most, every, read, clock
        self.apply = apply or _torch_threads
        self.cores = cores or os.cpu_count() or most
        self.count, self.wanted, self.changes = most, most, 0
        self.last, self.t = read(), clock()
        self.apply(most)

    def target(self, others: float) -> int:
        """The count for other processes using ``others`` cores: a core counts as taken once they use 30 % of it
        (a spinning thread that must share a core with them is worse than one thread fewer)."""
        taken = max(0, math.ceil(others - 0.3))
        return max(1, min(self.most, self.cores - taken))

    def tick(self) -> int:
        """Called every step; reads the machine only when ``every`` seconds have passed. The count in use."""
        now = self.clock()
        if self.last is None or now - self.t < self.every:
            return self.count
        reading = self.read()
        if reading is None:
            return self.count
        others = max(0.0, (reading[0] - self.last[0]) - (reading[1] - self.last[1])) / (now - self.t)
        self.last, self.t = reading, now
        want = self.target(others)
        if want != self.count and want == self.wanted:
            self.count, self.changes = want, self.changes + 1
            self.apply(want)
        self.wanted = want
        return self.count


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def training_threads(n: int) -> tuple[int, AdaptiveThreads | None, str]:
    """The trainer's threads for ``train.threads`` = ``n``: (count now, the adapter or None when fixed, the run
    line's words). 0 with OMP_NUM_THREADS set takes that count; 0 without it adapts to the free cores, up to
    PyTorch's count (one per core)."""
    import torch

    fixed = n or (torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else 0)
    if fixed or cpu_seconds() is None:
        count = set_threads(fixed, "train.threads")
        return count, None, f"threads={count} ({wait_policy()} wait)"
    adapter = AdaptiveThreads(torch.get_num_threads())
    return adapter.count, adapter, f"threads=1-{adapter.most} by the free cores ({wait_policy()} wait)"
