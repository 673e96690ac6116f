"""bnc.batch_norm_forward / batch_norm_backward against the float64 reference.

Covers the shape families of the kernels (inner == 1 "row" loops, short and long inner segments,
channel blocks that fit in cache and ones that do not), channels-last and other channel axes,
optional weight, bias and running statistics, float16 input with float32 parameters, bnc._core
called directly, and every ISA path this CPU has. Strided, misaligned and empty inputs, out= and
the in-place running statistics are in test_correctness_buffers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import reference
from helpers import (
    DTYPES,
    F16,
    F32,
    TOL,
    assert_close,
    case_id,
    check_against_reference,
    make_inputs,
    shape_id,
)

import bnc
from bnc import _core

# (shape, axis). The comments name the kernel path each shape exercises (csrc/kernels/impl/plan.h).
SHAPES = [
    ((16, 1), 1),  # (N, C), C = 1
    ((16, 3), 1),
    ((9, 37), 1),  # odd C: vector body plus scalar tail
    ((16, 1000), 1),  # many channels, several channel chunks
    ((2, 5), 1),  # smallest batch allowed in training
    ((40000, 3), 1),  # (N, C) too big for one cached block: row blocks merged in order
    ((3, 70000), 1),  # very many channels
    ((8, 5, 13), 1),  # (N, C, L), short segments
    ((4, 37, 100), 1),  # (N, C, L), segments long enough to vectorize along
    ((16, 3, 1, 1), 1),  # 1x1
    ((4, 37, 7, 7), 1),  # 7x7
    ((2, 3, 28, 28), 1),  # 28x28
    ((96, 3, 28, 28), 1),  # 28x28, channel bigger than a cached block
    ((64, 3, 28, 28), 1),  # float32: one channel per cached block, runs under 4 KiB (fused)
    ((256, 8, 7, 7), 1),  # short segments, channel chunk bigger than a cached block
    ((64, 2, 1030), 1),  # long segments with a tail, channel bigger than a cached block
    ((2, 3, 4, 5, 6), 1),  # (N, C, D, H, W)
    ((8, 7, 7, 16), -1),  # channels-last NHWC
    ((4, 5, 37), -1),  # channels-last NLC
    ((16, 1000), -1),  # (N, C) with axis=-1
    ((2, 4, 5, 6, 3), -1),  # channels-last NDHWC
    ((3, 4, 5, 6), 2),  # any other axis works as well
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_matches_reference(case, dtype, training):
    shape, axis = case
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=len(shape) + shape[axis])
    check_against_reference(x, dy, w, b, rm, rv, training=training, axis=axis)


@pytest.mark.parametrize("affine", ["none", "weight-only", "bias-only"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "case", [((16, 37), 1), ((4, 3, 7, 7), 1), ((4, 7, 7, 5), -1)], ids=shape_id
)
def test_optional_weight_and_bias(case, dtype, training, affine):
    shape, axis = case
    x, dy, w, b, rm, rv = make_inputs(shape, axis, dtype, seed=11)
    w = w if affine == "weight-only" else None
    b = b if affine == "bias-only" else None
    check_against_reference(x, dy, w, b, rm, rv, training=training, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", [((32, 5), 1), ((4, 6, 7, 7), 1), ((4, 7, 7, 6), -1)],
                         ids=shape_id)
def test_training_without_running_stats(case, dtype):
    shape, axis = case
    x, dy, w, b, _, _ = make_inputs(shape, axis, dtype, seed=5)
    check_against_reference(x, dy, w, b, None, None, training=True, axis=axis)


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_momentum_and_eps(momentum, eps):
    x, dy, w, b, rm, rv = make_inputs((8, 6, 5), 1, np.float64, seed=21)
    check_against_reference(x, dy, w, b, rm, rv, training=True, axis=1, momentum=momentum, eps=eps)
    check_against_reference(x, dy, w, b, rm, rv, training=False, axis=1, eps=eps)


def test_constant_channel():
    """A channel with zero variance normalizes to the bias (invstd = 1/sqrt(eps))."""
    x = np.full((6, 2, 3), 7.0)
    x[:, 1] = np.arange(18.0).reshape(6, 3)
    y, m, s = bnc.batch_norm_forward(x, None, np.array([0.25, 0.0]))
    np.testing.assert_allclose(y[:, 0], 0.25, atol=1e-12)
    assert m[0] == 7.0
    np.testing.assert_allclose(s[0], 1 / np.sqrt(1e-5), rtol=1e-14)


# -- float16 input, float32 parameters -------------------------------------------------------------


def test_float16_input():
    """float16 input takes float32 per-channel arrays; results match to half precision."""
    x, dy, w, b, rm, rv = make_inputs((8, 4, 6, 6), 1, np.float16, seed=2)
    w, b, rm, rv = (a.astype(np.float32) for a in (w, b, rm, rv))
    rm0, rv0 = rm.copy(), rv.copy()
    y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv)
    assert y.dtype == np.float16 and m.dtype == np.float32 and s.dtype == np.float32
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x, w, b, rm0, rv0)
    assert_close(y, ry, 5e-3, scale=1.0)
    assert_close(m, rmean, 1e-6)
    assert_close(s, rinvstd, 1e-5)
    assert_close(rm, rrm, 1e-6)
    assert_close(rv, rrv, 1e-5)
    dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w)
    assert dx.dtype == np.float16 and gw.dtype == np.float32
    rdx, rgw, rgb = reference.backward(dy, x, rmean, rinvstd, w)
    assert_close(dx, rdx, 5e-3, scale=float(np.abs(rdx).max()))
    assert_close(gw, rgw, 1e-5, scale=np.sqrt(x.size / 4))
    assert_close(gb, rgb, 1e-5, scale=np.sqrt(x.size / 4))


F16_CASES = [((16, 5), 1), ((8, 4, 6, 6), 1), ((8, 6, 6, 4), -1), ((4, 3, 130), 1),
             ((4, 6, 9, 9), 1)]


@pytest.mark.parametrize("shape,axis", F16_CASES, ids=case_id)
def test_float16_functional_against_float64_reference(shape, axis):
    x, dy, w, b, rm, rv = make_inputs(shape, axis, F16, seed=90 + shape[axis], offset=0.5)
    c = shape[axis]
    n = x.size // c
    rm1, rv1 = rm.copy(), rv.copy()
    y, m, s = bnc.batch_norm_forward(x, w, b, rm1, rv1, axis=axis)
    assert y.dtype == F16 and m.dtype == F32 and s.dtype == F32
    assert rm1.dtype == F32 and rv1.dtype == F32
    ry, rmean, rinvstd, rrm, rrv = reference.forward(x, w, b, rm, rv, axis=axis)
    np.testing.assert_allclose(y, ry, rtol=1e-3, atol=2e-3, err_msg="y")
    np.testing.assert_allclose(m, rmean, rtol=1e-6, atol=1e-6, err_msg="save_mean")
    np.testing.assert_allclose(s, rinvstd, rtol=1e-6, err_msg="save_invstd")
    np.testing.assert_allclose(rm1, rrm, rtol=1e-6, atol=1e-6, err_msg="running_mean")
    np.testing.assert_allclose(rv1, rrv, rtol=1e-6, err_msg="running_var")

    dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis)
    assert dx.dtype == F16 and gw.dtype == F32 and gb.dtype == F32
    rdx, rgw, rgb = reference.backward(dy, x, m, s, w, axis=axis)
    np.testing.assert_allclose(dx, rdx, rtol=1e-3, atol=2e-3 * max(1.0, np.abs(rdx).max()),
                               err_msg="dx")
    np.testing.assert_allclose(gw, rgw, rtol=1e-5, atol=1e-6 * np.sqrt(n), err_msg="grad_w")
    np.testing.assert_allclose(gb, rgb, rtol=1e-5, atol=1e-6 * np.sqrt(n), err_msg="grad_b")

    ye, _, _ = bnc.batch_norm_forward(x, w, b, rm1, rv1, training=False, axis=axis)
    rye = reference.forward(x, w, b, rm1, rv1, training=False, axis=axis)[0]
    assert ye.dtype == F16
    np.testing.assert_allclose(ye, rye, rtol=1e-3, atol=2e-3, err_msg="eval y")


# -- bnc._core called directly ---------------------------------------------------------------------


def test_core_direct_call_matches_functional():
    x, dy, w, b, rm, rv = make_inputs((6, 5, 4), 1, np.float64, seed=14)
    out = np.empty_like(x)
    sm, si = np.empty(5), np.empty(5)
    rm1, rv1 = rm.copy(), rv.copy()
    assert _core.forward_train(x, out, w, b, rm1, rv1, 1, 1e-5, 0.1, sm, si) == 0
    rm2, rv2 = rm.copy(), rv.copy()
    y, m, s = bnc.batch_norm_forward(x, w, b, rm2, rv2)
    for got, want in ((out, y), (sm, m), (si, s), (rm1, rm2), (rv1, rv2)):
        np.testing.assert_array_equal(got, want)
    _core.forward_eval(x, out, w, b, rm, rv, 1, 1e-5, sm, si)
    np.testing.assert_array_equal(out, bnc.batch_norm_forward(x, w, b, rm, rv, training=False)[0])
    dx, gw, gb = np.empty_like(x), np.empty(5), np.empty(5)
    _core.backward(dy, x, dx, m, s, w, 1, True, gw, gb)
    for got, want in zip((dx, gw, gb), bnc.batch_norm_backward(dy, x, m, s, w)):
        np.testing.assert_array_equal(got, want)


# -- every ISA path --------------------------------------------------------------------------------


ISA_CASES = [((33, 37), 1), ((4, 5, 7, 7), 1), ((3, 3, 100), 1), ((4, 7, 7, 19), -1)]

_ISA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import bnc
    assert bnc.config()["isa"] == sys.argv[1], bnc.config()
    rng = np.random.default_rng(0)
    out = {}
    for i, (shape, axis) in enumerate(json.loads(sys.argv[3])):
        shape = tuple(shape)
        for dtype in (np.float32, np.float64):
            c = shape[axis]
            x = (3 + 2 * rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w = rng.uniform(0.5, 2, c).astype(dtype)
            b = rng.standard_normal(c).astype(dtype)
            rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
            y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, axis=axis)
            dx, gw, gb = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis)
            ye, me, se = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
            dxe, gwe, gbe = bnc.batch_norm_backward(dy, x, me, se, w, training=False, axis=axis)
            arrays = dict(x=x, dy=dy, w=w, b=b, y=y, dx=dx, gw=gw, gb=gb, rm=rm, rv=rv,
                          ye=ye, dxe=dxe, gwe=gwe, gbe=gbe)
            for name, a in arrays.items():
                out[f"{i}-{np.dtype(dtype).name}-{name}"] = a
    np.savez(sys.argv[2], **out)
    """
)


@pytest.mark.parametrize("isa", bnc.config()["isa_available"])
def test_every_isa_path_matches_reference(isa, tmp_path):
    """Runs forward and backward in a fresh interpreter with BNC_FORCE_ISA=isa."""
    script = tmp_path / "isa_check.py"
    script.write_text(_ISA_SCRIPT)
    result_file = tmp_path / "result.npz"
    env = dict(os.environ, BNC_FORCE_ISA=isa)
    proc = subprocess.run(
        [sys.executable, str(script), isa, str(result_file), json.dumps(ISA_CASES)],
        env=env, capture_output=True, text=True, timeout=120,
        cwd=tmp_path,  # not the repository root, whose bnc/ would shadow the installed package
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(result_file) as data:
        results = dict(data)
    for i, (shape, axis) in enumerate(ISA_CASES):
        for dtype in DTYPES:
            key = f"{i}-{np.dtype(dtype).name}-"
            r = {k[len(key):]: v for k, v in results.items() if k.startswith(key)}
            tol = TOL[dtype]
            x, dy, w, b = r["x"], r["dy"], r["w"], r["b"]
            assert x.dtype == dtype
            c = shape[axis]
            n = x.size // c
            ry, rmean, rinvstd, rrm, rrv = reference.forward(
                x, w, b, np.zeros(c), np.ones(c), axis=axis
            )
            rdx, rgw, rgb = reference.backward(dy, x, rmean, rinvstd, w, axis=axis)
            assert_close(r["y"], ry, tol, what=f"{isa} y")
            assert_close(r["rm"], rrm, tol, what=f"{isa} running_mean")
            assert_close(r["rv"], rrv, tol, what=f"{isa} running_var")
            assert_close(r["dx"], rdx, tol, scale=float(np.abs(rdx).max()), what=f"{isa} dx")
            assert_close(r["gw"], rgw, tol, scale=np.sqrt(n), what=f"{isa} grad_weight")
            assert_close(r["gb"], rgb, tol, scale=np.sqrt(n), what=f"{isa} grad_bias")
            rye, rme, rse, _, _ = reference.forward(
                x, w, b, r["rm"], r["rv"], training=False, axis=axis
            )
            rdxe, rgwe, rgbe = reference.backward(dy, x, rme, rse, w, training=False, axis=axis)
            assert_close(r["ye"], rye, tol, what=f"{isa} eval y")
            assert_close(r["dxe"], rdxe, tol, scale=float(np.abs(rdxe).max()),
                         what=f"{isa} eval dx")
            assert_close(r["gwe"], rgwe, tol, scale=np.sqrt(n),
                         what=f"{isa} eval grad_weight")
            assert_close(r["gbe"], rgbe, tol, scale=np.sqrt(n), what=f"{isa} eval grad_bias")


@pytest.mark.parametrize("shape, dtype", [((1, 1, 1 << 20), np.float32),
                                          ((3, 2, 300001), np.float64)])
def test_long_channels_cut_into_blocks_match_the_reference(shape, dtype):
    """Segments longer than a task are cut into inner blocks: forward and backward still match
    the float64 reference."""
    x, dy, w, b, rm, rv = make_inputs(shape, 1, dtype, seed=23)
    check_against_reference(x, dy, w, b, rm, rv, training=True, axis=1)
