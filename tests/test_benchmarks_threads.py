"""benchmarks/threads.py: its table (medians, ranges, the ratio to the best setting under the same load) by hand,
and the competing load it starts is gone when the block ends."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import threads  # noqa: E402


def test_table_medians_and_ratios_by_hand():
    results = {("mnist", "quiet", "old"): [100.0, 90.0, 120.0], ("mnist", "quiet", "new"): [95.0, 99.0, 97.0],
               ("mnist", "busy", "old"): [2.0, 4.0, 3.0], ("mnist", "busy", "new"): [60.0, 66.0, 63.0]}
    rows = threads.table(results).splitlines()[2:]
    assert rows == ["| mnist | quiet | old | 100.00 [90.00-120.00] | 1.00 |",
                    "| mnist | quiet | new | 97.00 [95.00-99.00] | 1.03 |",
                    "| mnist | busy | old | 3.00 [2.00-4.00] | 21.00 |",
                    "| mnist | busy | new | 63.00 [60.00-66.00] | 1.00 |"]


def test_load_processes_run_inside_the_block_and_end_with_it():
    with threads.Load(2) as load:
        assert len(load.procs) == 2 and all(p.poll() is None for p in load.procs)
    assert all(p.poll() is not None for p in load.procs)
    with threads.Load(0) as load:
        assert load.procs == []
