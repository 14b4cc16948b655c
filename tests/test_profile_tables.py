"""minseg_ref.profile_tables, the GPU session's profiler tables, runs (here on the CPU)."""
import torch

from minseg_ref.profile_tables import profile_call


def test_profile_call_summarises_one_call():
    x = torch.rand(64, 64)
    report = profile_call(lambda: (x @ x).relu(), "cpu", rows=3)
    assert report.startswith("wall ") and "aten::mm" in report
