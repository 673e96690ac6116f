"""bnc.torch.SyncBatchNorm over torch.distributed (gloo on 127.0.0.1): tests/torch_dist_worker.py in
2 and 3 processes (exactness against single-process BatchNorm on the concatenated batch, uneven
and empty batches, both memory formats; misuse raising on every rank; no communication in eval or
in a backward without input gradient; DistributedDataParallel training equal to single-process
training). Every process is waited for with a timeout and killed if it hangs."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnc.torch as bt

WORKER = Path(__file__).with_name("torch_dist_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", ["exact", "misuse", "no_communication", "ddp"])
def test_gloo_processes(case, ranks):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), case, str(r), str(ranks), port],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(ranks)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report = "\n".join(f"--- rank {r} (exit {p.returncode})\n{o[-3000:]}"
                       for r, (p, o) in enumerate(zip(procs, outputs)))
    assert all(p.returncode == 0 for p in procs), report
    assert sum(f"OK {case}" in o for o in outputs) == ranks, report


def test_single_process_is_batchnorm():
    """Without a process group: bnc.torch's BatchNorm, the same numbers as torch's."""
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    sync, plain = bt.SyncBatchNorm(3).double(), torch.nn.BatchNorm1d(3).double()
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    assert not isinstance(sync, torch.nn.SyncBatchNorm)
    assert isinstance(sync, torch.nn.modules.batchnorm._BatchNorm)
    nested = bt.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)))
    assert type(nested[1]) is bt.SyncBatchNorm
