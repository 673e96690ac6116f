"""bnc.SyncBatchNorm over MPI: tests/mpi_worker.py under ``mpiexec -n 2`` and ``-n 3`` (exactness
against single-process BatchNorm on the concatenated batch with uneven and empty batches, the same
statistics bits on every rank, misuse raising on every rank, sub-communicators), each run with a
timeout: a regression fails, never hangs. mpi4py and mpich (whose mpiexec runs as root) come
with the test extra; under CI these tests must run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bnc

WORKER = Path(__file__).with_name("mpi_worker.py")


def _mpiexec():
    beside = Path(sys.executable).with_name("mpiexec")
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(
    not os.environ.get("CI") and (_mpiexec() is None or
                                  __import__("importlib").util.find_spec("mpi4py") is None),
    reason="needs mpi4py and an mpiexec (pip install mpi4py mpich)")


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", ["exact", "misuse", "subcommunicator"])
def test_under_mpiexec(case, ranks):
    assert _mpiexec() is not None, "mpiexec not found (pip install mpich)"
    proc = subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, str(WORKER), case],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"OK {case}") == ranks, proc.stdout + proc.stderr


@needs_mpi
def test_one_process_equals_batchnorm():
    from mpi4py import MPI

    x = np.random.default_rng(0).standard_normal((16, 4, 5))
    sync = bnc.SyncBatchNorm(4, dtype=np.float64, comm=MPI.COMM_SELF)
    plain = bnc.BatchNorm1d(4, dtype=np.float64)
    np.testing.assert_allclose(sync(x), plain(x), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(sync.backward(x), plain.backward(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sync.running_var, plain.running_var, rtol=1e-14)
    assert "comm=" in repr(sync)


def test_mpi4py_is_imported_only_for_a_sync_module():
    code = ("import sys, bnc; bnc.BatchNorm2d(3)(__import__('numpy').ones((2, 3, 2, 2), "
            "'float32')); assert 'mpi4py' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match="comm: expected an mpi4py communicator, got int"):
        bnc.SyncBatchNorm(3, comm=3)


@needs_mpi
def test_example_data_parallel_training_equals_single_process():
    """examples/mpi_train.py under mpiexec -n 2: its losses equal the single-process run's (the
    script aborts otherwise)."""
    example = Path(__file__).parent.parent / "examples" / "mpi_train.py"
    proc = subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(example)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "largest relative difference of the losses" in proc.stdout, proc.stdout
