"""`minseg bench`'s CPU peak memory (minseg_ref/peak_memory.py): a forward's extra resident memory, per side."""
from pathlib import Path

import pytest
import torch

from minseg_ref import peak_memory
from minseg_ref.bench import BenchRow, format_table

pytestmark = pytest.mark.skipif(not peak_memory.supported(), reason="needs Linux /proc and glibc malloc_trim")

MB = 2**20


def touch(mb: int) -> torch.Tensor:
    return torch.ones(mb * MB // 4)  # written, so every page is resident


def toy_forwards(device: str) -> dict:
    """Two 'models' whose forwards need 24 MB and 72 MB beyond what is already resident (8 MB of 'weights')."""
    weights = touch(8)
    return {"ours": lambda: touch(24).add_(weights[0]), "original": lambda: touch(72).add_(weights[0])}


def test_forward_peak_counts_what_the_call_touches():
    forward = toy_forwards("cpu")["ours"]
    forward()  # warm-up
    assert 23 <= peak_memory.forward_peak_mb(forward) <= 30


def test_each_side_in_its_own_process(monkeypatch):
    # the larger side first: in one process its pages, kept by malloc or in the high-water mark, would hide the other's
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    import test_peak_memory

    original = peak_memory.cpu_peak_mb(test_peak_memory.toy_forwards, [], "original", timeout=120)
    ours = peak_memory.cpu_peak_mb(test_peak_memory.toy_forwards, [], "ours", timeout=120)
    assert 71 <= original <= 80 and 23 <= ours <= 30


def test_table_says_how_peaks_were_measured():
    table = format_table([BenchRow("m", "cpu", "1x3x8x8", 2.0, 1.0, 24.4, 72.6)])
    assert "24/73" in table and "CPU peak MB = resident-set high-water mark" in table
