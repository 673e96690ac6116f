"""Golden digests: the SHA-256 of every output over a grid of shapes x dtypes x operations x
layouts x streaming on/off, on every ISA path this CPU has.

The digests pin the bits. A change that moves them is a numerics change: it says why in its commit
and regenerates them with ``python tests/test_golden.py --regenerate`` (which writes
``tests/golden_digests.json``). Every ISA path must give the same bits, so one digest per case
serves them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest

import bnc
from bnc import _core

_DIGESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_digests.json")

# (shape, axis): row family (N, C) incl. narrow folded rows and several chunks, the periodic
# (inner < 16) and segment families, fused and unfused (channels of more than 256 KiB), and
# channels-last.
SHAPES = [
    ((2, 5), 1),
    ((37, 3), 1),
    ((1000, 7), 1),
    ((513, 300), 1),
    ((40, 5000), 1),
    ((3000, 96), 1),
    ((16, 64, 5), 1),
    ((4, 8, 7, 9), 1),
    ((3, 4, 100), 1),
    ((8, 16, 20, 20), 1),
    ((2, 3, 4097), 1),
    ((8, 4, 9000), 1),
    ((4, 9, 9, 40), -1),
    ((64, 7, 7, 96), -1),
]
DTYPES = ["float16", "float32", "float64"]


def _inputs(shape, axis, dtype, seed):
    """Deterministic inputs (legacy RandomState streams are frozen across NumPy versions)."""
    rng = np.random.RandomState(seed)
    c = shape[axis]
    pdtype = np.float32 if dtype == "float16" else dtype
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, c).astype(pdtype)
    b = rng.standard_normal(c).astype(pdtype)
    rm = rng.standard_normal(c).astype(pdtype)
    rv = rng.uniform(0.5, 2.0, c).astype(pdtype)
    return x, dy, w, b, rm, rv


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _outputs(shape, axis, dtype, stream):
    """Digests of every output of every operation for one case, on the active ISA path."""
    seed = sum(shape) * 7 + len(dtype)
    x, dy, w, b, rm, rv = _inputs(shape, axis, dtype, seed)
    _core._set_stream_threshold_bytes(0 if stream else 1 << 62)
    try:
        out = {}
        rm_t, rv_t = rm.copy(), rv.copy()
        y, sm, si = bnc.batch_norm_forward(x, w, b, rm_t, rv_t, training=True, axis=axis)
        out["forward_train"] = _digest(y, sm, si, rm_t, rv_t)
        dx, gw, gb = bnc.batch_norm_backward(dy, x, sm, si, w, training=True, axis=axis)
        out["backward_train"] = _digest(dx, gw, gb)
        y0, sm0, si0 = bnc.batch_norm_forward(x, None, None, None, None, training=True,
                                              axis=axis, eps=1e-3)
        out["forward_train_plain"] = _digest(y0, sm0, si0)
        dx0, gw0, gb0 = bnc.batch_norm_backward(dy, x, sm0, si0, None, training=True, axis=axis)
        out["backward_train_plain"] = _digest(dx0, gw0, gb0)
        ye, sme, sie = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
        out["forward_eval"] = _digest(ye, sme, sie)
        # Running statistics far from zero: inference takes its split-mean form.
        rm_far = (rm + 100.0).astype(rm.dtype)
        yf, smf, sif = bnc.batch_norm_forward(x, w, b, rm_far, rv, training=False, axis=axis)
        out["forward_eval_far_mean"] = _digest(yf, smf, sif)
        dxe, gwe, gbe = bnc.batch_norm_backward(dy, x, sme, sie, w, training=False, axis=axis)
        out["backward_eval"] = _digest(dxe, gwe, gbe)
        return out
    finally:
        _core._set_stream_threshold_bytes(-1)


def _case_id(shape, axis, dtype, stream):
    return f"{'x'.join(map(str, shape))}-axis{axis}-{dtype}-{'stream' if stream else 'cached'}"


CASES = [(s, a, d, st) for s, a in SHAPES for d in DTYPES for st in (False, True)]


def _compute_all():
    return {_case_id(*case): _outputs(*case) for case in CASES}


@pytest.fixture(scope="module")
def golden():
    with open(_DIGESTS) as f:
        return json.load(f)


@pytest.mark.parametrize("isa", _core.available_isas())
def test_every_output_matches_its_golden_digest(golden, isa, restore_num_threads):
    active = _core.active_isa()
    bnc.set_num_threads(2)
    _core.select_isa(isa)
    try:
        mismatches = []
        for case in CASES:
            key = _case_id(*case)
            got = _outputs(*case)
            for op, digest in golden[key].items():
                if got[op] != digest:
                    mismatches.append(f"{key} {op}")
        assert not mismatches, f"{len(mismatches)} outputs moved on {isa}: {mismatches[:20]}"
    finally:
        _core.select_isa(active)


def test_golden_file_covers_the_grid(golden):
    assert sorted(golden) == sorted(_case_id(*case) for case in CASES)


if __name__ == "__main__":
    if "--regenerate" not in sys.argv:
        sys.exit("usage: python tests/test_golden.py --regenerate")
    bnc.set_num_threads(2)
    digests = _compute_all()
    for isa in _core.available_isas():
        _core.select_isa(isa)
        assert _compute_all() == digests, f"ISA {isa} differs from the best path"
    _core.select_isa("")
    with open(_DIGESTS, "w") as f:
        json.dump(digests, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(digests)} cases to {_DIGESTS}")
