"""Shared test setup: makes ``import reference`` (and ``helpers``) work and provides the
``torch``, ``restore_num_threads`` and ``stream_threshold`` fixtures."""

from __future__ import annotations

import os
import sys

import pytest

# pytest runs with --import-mode=importlib, which does not put tests/ on sys.path.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


class TorchMissing:
    """Stands in for torch when it cannot be imported under CI: a test that uses it fails."""

    def __init__(self, message: str) -> None:
        self.message = message


def import_torch():
    """Imports and returns torch.

    Without torch: when the environment variable CI is set (CI installs torch, so a missing
    torch there must not silently turn the parity tests into skips) it returns a
    ``TorchMissing``, which makes the calling test FAIL (see ``pytest_pyfunc_call``); otherwise
    the test is skipped.
    """
    try:
        import torch
    except ImportError as error:
        if os.environ.get("CI"):
            return TorchMissing(
                f"torch is required when CI is set (PyTorch parity tests), but importing it "
                f"failed: {error}"
            )
        pytest.skip(f"torch is not installed ({error}); set CI=1 to make this a failure")
    return torch


@pytest.fixture
def torch():
    """The torch module (see ``import_torch``: fail under CI, skip elsewhere when missing)."""
    return import_torch()


@pytest.fixture
def torch_importer():
    """The function behind the ``torch`` fixture, for testing its CI/non-CI behaviour."""
    return import_torch


def pytest_report_header(config):
    """Names the bnc under test: the source tree (editable install) or an installed wheel."""
    import bnc

    return f"bnc {bnc.__version__} from {os.path.dirname(bnc.__file__)}"


def pytest_pyfunc_call(pyfuncitem):
    """Fails (in the call phase, so it is reported as FAILED, not ERROR) a test whose ``torch``
    fixture could not import torch under CI."""
    value = pyfuncitem.funcargs.get("torch")
    if isinstance(value, TorchMissing):
        pytest.fail(value.message, pytrace=False)


@pytest.fixture
def restore_num_threads():
    """Restores bnc's thread count after a test that changes it."""
    import bnc

    before = bnc.get_num_threads()
    yield before
    bnc.set_num_threads(before)


@pytest.fixture
def stream_threshold():
    """Yields the default threshold; always restores it, even when the test fails."""
    from bnc import _core

    default = _core.stream_threshold_bytes()
    try:
        yield default
    finally:
        _core._set_stream_threshold_bytes(-1)
    assert _core.stream_threshold_bytes() == default
