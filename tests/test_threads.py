"""CPU threads: sample.py and evaluate.py sleep in OpenMP waits (set before torch loads, unless the user chose a
policy); the trainer keeps the spin and runs one thread fewer per core that other processes hold, or a fixed
count (train.threads, OMP_NUM_THREADS), shown on the run line; a bad count is one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import FAST, REPO, cli, run_script, train, train_cli
from utils.threads import AdaptiveThreads, training_threads


def probe(code: str, env: dict[str, str]) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.slow  # runs sample.py and evaluate.py in processes
def test_sample_and_evaluate_sleep_in_waits_unless_the_user_chose():
    code = "import utils.sleeping_waits, os, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert probe(code, {}) == ["PASSIVE"]
    assert probe(code, {"OMP_WAIT_POLICY": "active"}) == ["active"]
    assert probe(code, {"GOMP_SPINCOUNT": "1000"}) == ["None"]  # a spin count is a policy too: left alone
    late = "import torch, os, utils.threads as t; print(os.environ.get('OMP_WAIT_POLICY'), t.passive_wait())"
    assert probe(late, {}) == ["None", "False"]  # once torch has loaded it is too late, and nothing is set
    for script in ("sample.py", "evaluate.py"):
        first = [line for line in (REPO / script).read_text().splitlines() if line.startswith(("import", "from"))]
        assert first[1] == "import utils.sleeping_waits  # noqa: F401  (first: the OpenMP wait policy is read " \
                           "when torch loads)", (script, first[:2])  # (after from __future__)


class Machine:
    """A fake clock and CPU counters: other processes use ``others`` cores from now on."""

    def __init__(self):
        self.t, self.busy, self.own, self.others, self.applied = 0.0, 0.0, 0.0, 0.0, []

    def advance(self, seconds: float, own_cores: float = 2.0) -> None:
        self.t += seconds
        self.busy += seconds * (self.others + own_cores)
        self.own += seconds * own_cores


def test_the_count_follows_the_free_cores_after_two_checks():
    m = Machine()
    a = AdaptiveThreads(2, every=1.0, read=lambda: (m.busy, m.own), clock=lambda: m.t, apply=m.applied.append,
                        cores=2)
    assert a.count == 2 and m.applied == [2]
    m.others = 1.0  # another job takes a core
    m.advance(0.5)
    assert a.tick() == 2 and a.last == (0.0, 0.0)  # under a second since the last check: not even read
    m.advance(0.75)  # (binary fractions: the fake clock adds exactly)
    assert a.tick() == 2  # the first check that asks for 1: not yet
    m.advance(1.0)
    assert a.tick() == 1 and m.applied == [2, 1]
    for others in (0.0, 1.0, 0.0):  # quiet, busy, quiet: no two checks in a row ask for 2
        m.others = others
        m.advance(1.0, own_cores=1.0)
        assert a.tick() == 1 and a.tick() == 1
    m.advance(1.0, own_cores=1.0)  # the second quiet check in a row
    assert a.tick() == 2 and m.applied == [2, 1, 2] and a.changes == 2


@pytest.mark.parametrize("others,cores,most,count", [(0.0, 2, 2, 2), (0.3, 2, 2, 2), (0.31, 2, 2, 1), (1.0, 2, 2, 1),
                                                      (1.3, 2, 2, 1), (3.0, 2, 2, 1), (1.31, 8, 8, 6),
                                                      (0.0, 8, 4, 4), (6.5, 8, 4, 1)])
def test_a_core_counts_as_taken_once_others_use_30_percent_of_it(others, cores, most, count):
    a = AdaptiveThreads(most, read=lambda: None, apply=lambda n: None, cores=cores)
    assert a.target(others) == count


def test_a_fixed_count_is_kept(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert training_threads(1)[1] is None and torch.get_num_threads() == 1
        count, adapter, said = training_threads(0)
        assert adapter is not None and said.startswith(f"threads=1-{adapter.most} by the free cores")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert training_threads(0)[1] is None  # OMP_NUM_THREADS is the user's choice: nothing adapts
    finally:
        torch.set_num_threads(before)


def test_the_trainer_checks_the_free_cores_every_step(tmp_path, real_data, monkeypatch):
    """Without a fixed count the loop asks the adapter at every step (it reads the machine once a second)."""
    import utils.threads

    calls = []
    tick = utils.threads.AdaptiveThreads.tick
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(utils.threads.AdaptiveThreads, "tick", lambda self: calls.append(1) or tick(self))
    train(tmp_path / "run", extra=["train.steps=3", "model.hidden=32"])
    assert len(calls) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a fixed count: nothing to ask
    train(tmp_path / "fixed", extra=["train.steps=3", "model.hidden=32"])
    assert len(calls) == 3


@pytest.mark.slow  # trains
def test_run_line_and_metrics_show_the_count(tmp_path, real_data):
    res = run_script(["train_vae.py", "-c", "configs/mnist.yaml", "-e", str(tmp_path / "run"), *FAST,
                      "train.steps=2", "train.threads=2", "model.hidden=32"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "threads=2 (" in res.stdout, res.stdout
    assert '"threads": 2' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_bad_thread_counts_are_one_line(tmp_path):
    import evaluate
    import sample

    res = train_cli(["-c", str(REPO / "configs/mnist.yaml"), "-e", str(tmp_path / "r"), "train.threads=-1"])
    assert res.returncode == 2 and "train.threads" in res.stderr and not (tmp_path / "r").exists()
    for main in (sample.main, evaluate.main):
        res = cli(main, ["--threads", "-3"])
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--threads" in res.stderr, res.stderr
