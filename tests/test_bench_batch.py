"""scripts/bench_batch.py: the memory cap kills a process over it, and the batch search."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_batch", REPO / "scripts" / "bench_batch.py")
bench_batch = importlib.util.module_from_spec(_spec)
sys.modules["bench_batch"] = bench_batch  # dataclasses look their module up there
_spec.loader.exec_module(bench_batch)

MIB = 2**20

# Touches `mib` MiB (bytearray zero-fills, so every page is resident), then exits
# reporting its own peak as the benchmark's children do.
_ALLOCATE = (
    "import sys, time; x = bytearray({mib} * 2**20); time.sleep(0.3); print('done'); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
    "print('PEAK_RSS', int(hwm) * 1024)"
)


def _allocate(mib: int, cap_mib: int, timeout: float = 60.0) -> bench_batch.CappedRun:
    cmd = [sys.executable, "-c", _ALLOCATE.format(mib=mib)]
    return bench_batch.run_capped(cmd, dict(os.environ), cap_mib * MIB, 0.02, timeout)


def test_a_process_under_the_cap_finishes_and_its_peak_counts_what_it_touched():
    run = _allocate(200, cap_mib=2048)
    assert not run.over_cap and not run.timed_out and run.returncode == 0
    assert run.stdout.splitlines()[0] == "done"
    assert 200 * MIB <= run.peak < 400 * MIB


def test_the_launchers_own_memory_is_not_counted():
    ballast = bytearray(800 * MIB)  # the launcher (a test run, a benchmark) may be large
    run = _allocate(50, cap_mib=400)
    assert not run.over_cap and run.peak < 400 * MIB, run.peak / MIB
    del ballast


def test_a_process_over_the_cap_is_killed():
    run = _allocate(600, cap_mib=300)
    assert run.over_cap
    assert "done" not in run.stdout  # killed before it could finish
    assert run.peak > 300 * MIB


def test_a_process_past_the_timeout_is_killed():
    cmd = [sys.executable, "-c", "import time; time.sleep(30)"]
    run = bench_batch.run_capped(cmd, dict(os.environ), 2**40, 0.02, timeout=0.5)
    assert run.timed_out and not run.over_cap and run.returncode != 0


def _search(contender: str, fits: int, monkeypatch, **flags) -> tuple[dict, list[int]]:
    """Searches against a fake trial that trains every batch up to `fits`."""
    tried = []

    def fake_trial(_, batch, __):
        tried.append(batch)
        return {"ok": batch <= fits, "peak": batch * MIB, "seconds": 1.0, "why": "over"}

    monkeypatch.setattr(bench_batch, "trial", fake_trial)
    args = argparse.Namespace(**{"start": 32, "max_batch": 512, "bisect": 1, "chunk": 32, **flags})
    return bench_batch.search(contender, args), tried


def test_search_doubles_then_bisects(monkeypatch):
    found, tried = _search("peer-plain", 100, monkeypatch)
    assert tried == [32, 64, 128, 96]
    assert (found["batch"], found["at_limit"]) == (96, False)


def test_search_halves_when_the_start_fails(monkeypatch):
    found, tried = _search("embedder-plain", 40, monkeypatch, start=64)
    assert tried == [64, 32, 48]
    assert (found["batch"], found["at_limit"]) == (32, False)


def test_search_keeps_cached_batches_on_chunk_multiples_and_stops_at_the_limit(monkeypatch):
    found, tried = _search("embedder-cached", 10**9, monkeypatch, max_batch=400)
    assert tried == [32, 64, 128, 256, 384]
    assert (found["batch"], found["at_limit"]) == (384, True)
    found, tried = _search("embedder-cached", 200, monkeypatch, bisect=2)
    assert tried == [32, 64, 128, 256, 192, 224]
    assert found["batch"] == 192
