"""minseg_ref.dispatch_count: the counts that stand in for GPU kernel launches and host-device syncs."""
import torch

from minseg_ref.dispatch_count import count


def test_counts_ops_and_host_reads():
    t = torch.rand(10, generator=torch.Generator().manual_seed(0))

    def forward():
        a = (t * 2).view(2, 5).t().contiguous()  # mul and the copy: 2 ops, views not counted
        keep = torch.where(t > 0.5)[0]  # gt, and a data-dependent shape: 1 read
        n = int(t.sum() > 1) + t[t > 0.2].shape[0]  # int() of a tensor: 1 read; bool index: 1 read
        return a, n, torch.equal(a, a), t.tolist()  # 2 reads

    c = count(forward, "tests")
    assert sum(c.reads.values()) == 5
    assert sum(c.ops.values()) >= 6
    assert set(c.reads) == {"test_dispatch_count.py:forward"}
