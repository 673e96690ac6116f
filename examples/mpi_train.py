"""Data-parallel training of a small NumPy network with bnc.SyncBatchNorm, under MPI.

    mpiexec -n 2 python examples/mpi_train.py

Every process takes its slice of each batch (uneven slices are fine); SyncBatchNorm normalizes
with the statistics of the whole batch, and the linear layers' gradients are summed over the
processes in rank order. Rank 0 also trains the same network on the whole batch in one process,
with bnc.BatchNorm1d, and prints both losses: they are equal to float64 rounding (the script
exits with an error if they drift apart).

The network: x (N, 16) -> Linear(16, 32) -> SyncBatchNorm -> ReLU -> Linear(32, 4) -> softmax
cross-entropy, plain SGD, float64.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

import bnc

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


class Net:
    def __init__(self, bn, seed=0):
        rng = np.random.default_rng(seed)
        self.w1 = rng.standard_normal((16, 32)) / 4
        self.w2 = rng.standard_normal((32, 4)) / 6
        self.bn = bn

    def step(self, x, labels, batch_size, lr=0.1):
        """One SGD step; returns this process's share of the loss (sum over its rows / batch)."""
        h = x @ self.w1
        z = self.bn(h)
        a = np.maximum(z, 0)
        logits = a @ self.w2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.log(p[np.arange(len(labels)), labels]).sum() / batch_size
        dlogits = p
        dlogits[np.arange(len(labels)), labels] -= 1
        dlogits /= batch_size
        grads = {"w2": a.T @ dlogits}
        dz = (dlogits @ self.w2.T) * (z > 0)
        dh = self.bn.backward(dz)
        grads["w1"] = x.T @ dh
        grads["gamma"], grads["beta"] = self.bn.grad_weight, self.bn.grad_bias
        return loss, grads

    def apply(self, grads, lr=0.1):
        self.w1 -= lr * grads["w1"]
        self.w2 -= lr * grads["w2"]
        self.bn.weight -= lr * grads["gamma"]
        self.bn.bias -= lr * grads["beta"]


def summed(grads):
    """Each gradient summed over the processes, in rank order (the same bits everywhere)."""
    rows = COMM.allgather(grads)
    return {k: sum((r[k] for r in rows[1:]), rows[0][k].copy()) for k in grads}


def main():
    rng = np.random.default_rng(42)
    teacher = rng.standard_normal((16, 4))
    parallel = Net(bnc.SyncBatchNorm(32, dtype=np.float64))
    single = Net(bnc.BatchNorm1d(32, dtype=np.float64)) if RANK == 0 else None
    worst = 0.0
    for step in range(20):
        x = rng.standard_normal((64, 16))
        labels = (x @ teacher).argmax(axis=1)
        cuts = np.linspace(0, 64, SIZE + 1).astype(int) + np.arange(SIZE + 1) % 2 * (SIZE > 1)
        cuts[0], cuts[-1] = 0, 64  # uneven slices
        mine = slice(cuts[RANK], cuts[RANK + 1])
        share, grads = parallel.step(x[mine], labels[mine], batch_size=64)
        loss = sum(COMM.allgather(share))
        parallel.apply(summed(grads))
        if RANK == 0:
            reference, grads = single.step(x, labels, batch_size=64)
            single.apply(grads)
            worst = max(worst, abs(loss - reference) / abs(reference))
            print(f"step {step:2d}  loss {loss:.12f}  single process {reference:.12f}")
    if RANK == 0:
        print(f"{SIZE} processes; largest relative difference of the losses: {worst:.1e}")
        if worst > 1e-9:
            print("the data-parallel losses drifted from the single-process ones", file=sys.stderr)
            COMM.Abort(1)


if __name__ == "__main__":
    main()
