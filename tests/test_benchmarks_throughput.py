"""The throughput benchmark runs end to end and prints its table (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from conftest import DATA, REPO, run_script


def test_throughput_benchmark_prints_its_table(tmp_path, real_data):
    out = tmp_path / "bench.json"
    proc = run_script([str(REPO / "benchmarks" / "throughput.py"), "--steps", "12", "--warmup", "4", "--window", "4",
                       "--repeats", "1", "--sample_n", "200", "--sample_batch", "100", "--json", str(out),
                       f"data.root={DATA}", "model.base_width=8", "train.batch_size=32"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: cpu") and "config: bench_mnist.yaml" in lines[0]
    assert "| loop | steps/s | images/s | peak memory (MB) |" in lines
    assert any(line.startswith("| trainer |") for line in lines) and any(line.startswith("| plain loop |")
                                                                         for line in lines)
    assert any(line.startswith("sampling, 200 prior samples: decoder") for line in lines)
    result = json.loads(out.read_text())
    trainer, plain = result["trainer"], result["plain loop"]
    assert trainer["steps_per_s"] > 0 and plain["steps_per_s"] > 0
    assert result["ratio"] == pytest.approx(trainer["steps_per_s"] / plain["steps_per_s"])
    assert trainer["images_per_s"] == trainer["steps_per_s"] * 32 and len(trainer["runs"]) == 1
    assert f"| trainer / plain | {result['ratio']:.3f} | | |" in lines
