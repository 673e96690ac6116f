"""``python -m bnc bench sync``: what synchronizing costs per layer, at 2 processes.

A training step of one layer (forward, backward) with the layer's batch split over 2 processes:
SyncBatchNorm against the same layer's local BatchNorm on the same per-process batch, over MPI
(bnc.SyncBatchNorm under ``mpiexec -n 2``, when mpi4py and mpiexec are there) and over
torch.distributed with gloo on 127.0.0.1 (bnc.torch.SyncBatchNorm, when torch is there). Each
process runs its kernels on one thread (the machine's cores are shared by the processes).
Medians of rank 0.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

import bnc

# per-process batch shapes
SHAPES = [(128, 1024), (16, 256, 56, 56), (16, 1024, 14, 14), (16, 2048, 7, 7)]


def _median(fn: Callable[[], object], barrier: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        barrier()
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return float(np.median(samples))


def _mpi_worker(repeats: int) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bnc.set_num_threads(1)
    rows = []
    for shape in SHAPES:
        x = np.random.default_rng(comm.Get_rank()).standard_normal(shape).astype(np.float32)
        dy = np.ones_like(x)
        cls = bnc.BatchNorm1d if len(shape) == 2 else bnc.BatchNorm2d
        local, sync = cls(shape[1]), bnc.SyncBatchNorm(shape[1])

        def step(m):
            return lambda: (m(x), m.backward(dy))
        t_local = _median(step(local), comm.Barrier, repeats)
        t_sync = _median(step(sync), comm.Barrier, repeats)
        rows.append((shape, t_local, t_sync))
    if comm.Get_rank() == 0:
        _print("MPI (" + MPI.Get_library_version().splitlines()[0].strip() + ")", rows)


def _gloo_worker(rank: int, port: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    import bnc.torch as bt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    bnc.set_num_threads(1)
    torch.set_num_threads(1)
    rows = []
    for shape in SHAPES:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=g)
        dy = torch.ones(shape)
        cls = bt.BatchNorm1d if len(shape) == 2 else bt.BatchNorm2d
        local, sync = cls(shape[1]), bt.SyncBatchNorm(shape[1])

        def step(m):
            def run():
                xi = x.detach().requires_grad_()
                m(xi).backward(dy)
            return run
        t_local = _median(step(local), dist.barrier, repeats)
        t_sync = _median(step(sync), dist.barrier, repeats)
        rows.append((shape, t_local, t_sync))
    if rank == 0:
        _print(f"torch.distributed gloo (torch {torch.__version__})", rows)
    dist.barrier()
    sys.stdout.flush()
    import os

    os._exit(0)  # (gloo's threads can abort a normal interpreter exit)


def _print(title: str, rows: List) -> None:
    print(f"\n{title}, 2 processes, 1 thread each: a training step (forward + backward)")
    print("| per-process batch | local ms | sync ms | synchronization ms | sync / local |")
    print("|---|---:|---:|---:|---:|")
    for shape, local, sync in rows:
        print(f"| {'x'.join(map(str, shape))} | {local * 1e3:.3f} | {sync * 1e3:.3f} "
              f"| {(sync - local) * 1e3:.3f} | {sync / local:.2f}x |")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnc bench sync",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--worker", choices=["mpi", "gloo"], help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "mpi":
        _mpi_worker(args.repeats)
        return 0
    if args.worker == "gloo":
        _gloo_worker(args.rank, args.port, args.repeats)
        return 0
    me = [sys.executable, "-m", "bnc.bench_sync", "--repeats", str(args.repeats)]
    mpiexec = Path(sys.executable).with_name("mpiexec")
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    if mpiexec:
        subprocess.run([mpiexec, "-n", "2", *me, "--worker", "mpi"], check=True, timeout=1200)
    else:
        print("MPI: not measured (needs mpi4py and mpiexec: pip install mpi4py mpich)")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("gloo: not measured (needs torch)")
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([*me, "--worker", "gloo", "--rank", str(r), "--port", port])
             for r in range(2)]
    codes: Dict[int, int] = {r: p.wait(timeout=1200) for r, p in enumerate(procs)}
    return max(codes.values())


if __name__ == "__main__":
    sys.exit(main())
