"""One process of the torch.distributed tests (tests/test_sync_torch.py starts N of them on
127.0.0.1 with gloo). Checks itself; exits 0 and prints "OK <case>" on success."""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import bnc.torch as bt

RANK, SIZE = int(sys.argv[2]), int(sys.argv[3])


def split_rows(total):
    shares = [r + 1 for r in range(SIZE)]
    if SIZE == 3:
        shares[1] = 0  # an empty batch
    bounds = np.cumsum([0] + [total * s // sum(shares) for s in shares])
    bounds[-1] = total
    return int(bounds[RANK]), int(bounds[RANK + 1])


def all_sum(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def case_exact():
    for shape, fmt, dtype in [((12, 5), None, torch.float64),
                              ((10, 6, 3, 4), torch.channels_last, torch.float64),
                              ((9, 4, 5), None, torch.float32)]:
        g = torch.Generator().manual_seed(3)
        full = 4 + 2 * torch.randn(shape, generator=g, dtype=dtype)
        dy_full = torch.randn(shape, generator=g, dtype=dtype)
        if fmt is not None:
            full = full.contiguous(memory_format=fmt)
            dy_full = dy_full.contiguous(memory_format=fmt)
        lo, hi = split_rows(shape[0])
        cls = nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d
        single = cls(shape[1]).to(dtype)
        with torch.no_grad():
            single.weight.uniform_(0.5, 1.5, generator=g)
            single.bias.uniform_(-1, 1, generator=g)
        sync = bt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(single))
        assert type(sync) is bt.SyncBatchNorm and not isinstance(sync, nn.SyncBatchNorm)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5,
                                                                             atol=2e-5)
        for step in range(2):
            xf = full.clone().requires_grad_()
            x = full[lo:hi].clone().requires_grad_()
            y_full, y = single(xf), sync(x)
            torch.testing.assert_close(y, y_full[lo:hi], **tol)
            if fmt is not None and hi > lo:
                assert y.is_contiguous(memory_format=fmt)
            y_full.backward(dy_full)
            y.backward(dy_full[lo:hi])
            torch.testing.assert_close(x.grad, xf.grad[lo:hi], **tol)
            torch.testing.assert_close(all_sum(sync.weight.grad), single.weight.grad, **tol)
            torch.testing.assert_close(all_sum(sync.bias.grad), single.bias.grad, **tol)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(sync, name), getattr(single, name), **tol)
            mine = sync.running_var.clone()
            everyone = [torch.empty_like(mine) for _ in range(SIZE)]
            dist.all_gather(everyone, mine)
            assert all(torch.equal(e, mine) for e in everyone), "running_var differs by rank"
            single.zero_grad()
            sync.zero_grad()


def case_misuse():
    c = 4 if RANK == 0 else 5
    try:
        bt.SyncBatchNorm(c)(torch.randn(4, c))
    except ValueError as error:
        assert "disagree on channels (rank 0: 4, rank 1: 5" in str(error), str(error)
    else:
        raise AssertionError("no ValueError")
    try:
        bt.SyncBatchNorm(3)(torch.ones(1 if RANK == 0 else 0, 3))
    except ValueError as error:
        assert "Expected more than 1 value per channel" in str(error), str(error)
    else:
        raise AssertionError("no ValueError")


def case_no_communication():
    calls = []
    real = dist.all_gather_object
    dist.all_gather_object = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    m = bt.SyncBatchNorm(3)
    x = torch.randn(6, 3)
    m(x).sum().backward()  # x needs no gradient: only the forward communicates
    assert len(calls) == 1, calls
    m.eval()
    m(x.requires_grad_()).sum().backward()
    assert len(calls) == 1, calls
    dist.all_gather_object = real


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        return self.net(x)


def case_ddp():
    torch.manual_seed(0)
    single = SmallCNN().double()
    model = bt.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(single))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    per_rank = 4
    for step in range(4):
        x = torch.randn(per_rank * SIZE, 3, 8, 8, generator=g, dtype=torch.float64)
        target = torch.randint(0, 4, (per_rank * SIZE,), generator=g)
        mine = slice(RANK * per_rank, (RANK + 1) * per_rank)
        opt_single.zero_grad()
        loss_single = nn.functional.cross_entropy(single(x), target)
        loss_single.backward()
        opt_single.step()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x[mine]), target[mine])
        loss.backward()
        opt.step()
        losses = [torch.zeros(()) for _ in range(SIZE)]
        dist.all_gather(losses, loss.detach().float())
        torch.testing.assert_close(torch.stack(losses).double().mean(), loss_single.detach(),
                                   rtol=1e-6, atol=1e-7)
        for (name, p_single), p in zip(single.named_parameters(), model.parameters()):
            torch.testing.assert_close(p, p_single, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, n=name: f"step {step}: {n}: {m}")
        for (name, b_single), b in zip(single.named_buffers(), model.buffers()):
            torch.testing.assert_close(b, b_single, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, n=name: f"step {step}: {n}: {m}")


CASES = {"exact": case_exact, "misuse": case_misuse, "no_communication": case_no_communication,
         "ddp": case_ddp}

if __name__ == "__main__":
    case, port = sys.argv[1], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=RANK,
                            world_size=SIZE)
    CASES[case]()
    dist.barrier()
    print(f"OK {case} rank {RANK}", flush=True)
    # No teardown: gloo's threads with a DistributedDataParallel reducer alive can abort the
    # interpreter's exit ("terminate called without an active exception") after the test passed.
    os._exit(0)
