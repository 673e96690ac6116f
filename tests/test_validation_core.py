"""bnc._core called directly with bad arguments: it must raise TypeError or ValueError (with the
message the binding gives), never crash, and never write into any argument. The binding checks
every buffer again (dtype, byte order, shape, contiguity, writeability, overlap) because the
functional layer is not the only caller."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    F16,
    F32,
    F64,
    case_id,
    collect_failures,
    make_read_only,
    malformed,
    raises,
    rejects,
    snapshot,
    unchanged,
    untouched,
)

import bnc
from bnc import _core

# -- each check and its message --------------------------------------------------------------------


def _core_train_args(dtype=np.float32, shape=(4, 3)):
    rng = np.random.default_rng(0)
    c = shape[1]
    return dict(
        x=rng.standard_normal(shape).astype(dtype),
        out=np.full(shape, 9.0, dtype),
        weight=np.ones(c, dtype), bias=np.zeros(c, dtype),
        running_mean=np.zeros(c, dtype), running_var=np.ones(c, dtype),
        axis=1, eps=1e-5, momentum=0.1,
        save_mean=np.full(c, 9.0, dtype), save_invstd=np.full(c, 9.0, dtype),
    )


def _core_eval_args(dtype=np.float32, shape=(4, 3)):
    args = _core_train_args(dtype, shape)
    del args["momentum"]
    return args


def _core_backward_args(dtype=np.float32, shape=(4, 3)):
    rng = np.random.default_rng(1)
    c = shape[1]
    return dict(
        dy=rng.standard_normal(shape).astype(dtype),
        x=rng.standard_normal(shape).astype(dtype),
        out=np.full(shape, 9.0, dtype),
        save_mean=np.zeros(c, dtype), save_invstd=np.ones(c, dtype), weight=np.ones(c, dtype),
        axis=1, training=True,
        grad_weight=np.full(c, 9.0, dtype), grad_bias=np.full(c, 9.0, dtype),
    )


CORE_FUNCS = {
    "forward_train": (_core.forward_train, _core_train_args),
    "forward_eval": (_core.forward_eval, _core_eval_args),
    "backward": (_core.backward, _core_backward_args),
}


def _call_core(func_name, args):
    func, _ = CORE_FUNCS[func_name]
    arrays = [v for v in args.values() if isinstance(v, np.ndarray)]
    with unchanged(*arrays):
        func(**args)


def _arrays(func_name):
    return [k for k, v in CORE_FUNCS[func_name][1]().items() if isinstance(v, np.ndarray)]


def _outputs(func_name):
    return {"forward_train": ["out", "running_mean", "running_var", "save_mean", "save_invstd"],
            "forward_eval": ["out", "save_mean", "save_invstd"],
            "backward": ["out", "grad_weight", "grad_bias"]}[func_name]


CORE_ARRAY_CASES = [(f, a) for f in CORE_FUNCS for a in _arrays(f)]
CORE_OUTPUT_CASES = [(f, a) for f in CORE_FUNCS for a in _outputs(f)]


@pytest.mark.parametrize("func_name,arg", CORE_ARRAY_CASES)
def test_core_wrong_dtype(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    args[arg] = args[arg].astype(np.float64)  # for x (dy): the other arrays are then wrong
    with pytest.raises(TypeError, match=r"expected dtype float(16|32|64)"):
        _call_core(func_name, args)
    args = CORE_FUNCS[func_name][1]()
    args[arg] = args[arg].astype(np.int32)
    with pytest.raises(TypeError, match=r"expected dtype"):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name", list(CORE_FUNCS))
def test_core_non_native_byte_order(func_name):
    """A byte-swapped float32 array has dtype.char 'f' too; it must be rejected, not mis-read
    (inputs) or written in the wrong byte order (outputs)."""
    accepted = []
    for arg in _arrays(func_name):
        args = CORE_FUNCS[func_name][1]()
        args[arg] = args[arg].astype(args[arg].dtype.newbyteorder(">"))
        try:
            _call_core(func_name, args)
        except TypeError as error:
            assert "expected dtype" in str(error), (arg, str(error))
        except AssertionError:  # not rejected, and an argument was written
            accepted.append(arg)
        else:
            accepted.append(arg)
    assert accepted == [], f"bnc._core.{func_name} accepted non-native byte order for {accepted}"


@pytest.mark.parametrize("func_name,arg", CORE_ARRAY_CASES)
def test_core_non_contiguous(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    a = args[arg]
    wide = np.repeat(a, 2, axis=-1)
    args[arg] = wide[..., ::2]
    assert not args[arg].flags.c_contiguous and args[arg].shape == a.shape
    with raises(ValueError, f"{arg}: expected a C-contiguous array, got a strided one"):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name,arg", CORE_ARRAY_CASES)
def test_core_wrong_length(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    a = args[arg]
    if a.ndim == 1:
        args[arg] = np.ones(a.size + 1, a.dtype)
        fragment = f"{arg}: expected shape (3,), got (4,)"
    else:
        args[arg] = np.ones((a.shape[0] + 1,) + a.shape[1:], a.dtype)
        fragment = "expected shape (4, 3), got (5, 3)"
    if func_name == "backward" and arg == "dy":
        fragment = "x: expected shape (5, 3) (the shape of dy), got (4, 3)"  # dy defines it
    elif func_name == "backward" and arg == "x":
        fragment = "x: expected shape (4, 3) (the shape of dy), got (5, 3)"
    elif func_name != "backward" and arg == "x":
        fragment = "out: expected shape (5, 3), got (4, 3)"  # x defines the shape
    with raises(ValueError, fragment):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name,arg", CORE_OUTPUT_CASES)
def test_core_read_only_output(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    args[arg] = make_read_only(args[arg])
    with raises(ValueError, f"{arg}: expected a writeable array, got a read-only one"):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name,arg", CORE_OUTPUT_CASES)
def test_core_overlapping_outputs(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    # alias this output with another argument of the same shape
    same_shape = [k for k in _arrays(func_name) if k != arg and args[k].shape == args[arg].shape]
    for other in same_shape:
        call = dict(args)
        call[arg] = call[other]
        with pytest.raises(ValueError, match="expected memory not shared with"):
            _call_core(func_name, call)


def test_core_partially_overlapping_out():
    buf = np.zeros((5, 3), np.float32)
    args = _core_train_args()
    buf[:4] = args["x"]
    args["x"], args["out"] = buf[:4], buf[1:]
    with raises(ValueError, "out: expected memory not shared with x"):
        _call_core("forward_train", args)
    args = _core_backward_args()
    buf[1:] = args["x"]
    args["x"], args["out"] = buf[1:], buf[:4]
    with raises(ValueError, "out: expected memory not shared with x"):
        _call_core("backward", args)


@pytest.mark.parametrize("func_name", list(CORE_FUNCS))
@pytest.mark.parametrize("arg", ["x", "out"])
def test_core_non_array_arguments(func_name, arg):
    args = CORE_FUNCS[func_name][1]()
    key = "dy" if (func_name == "backward" and arg == "x") else arg
    args[key] = args[key].tolist()
    with raises(TypeError, f"{key}: expected a numpy.ndarray, got list"):
        _call_core(func_name, args)
    args[key] = None
    with raises(TypeError, f"{key}: expected a numpy.ndarray, got NoneType"):
        _call_core(func_name, args)


@pytest.mark.parametrize("func_name", ["forward_train", "forward_eval"])
def test_core_axis(func_name):
    for axis in (2, -1, 100):
        args = CORE_FUNCS[func_name][1]()
        args["axis"] = axis
        with raises(ValueError, "axis: expected 0 <= axis < 2, got"):
            _call_core(func_name, args)


def test_core_backward_axis():
    for axis in (2, -1):
        args = _core_backward_args()
        args["axis"] = axis
        with raises(ValueError, "axis: expected 0 <= axis < 2, got"):
            _call_core("backward", args)


def test_core_forward_train_one_value_per_channel():
    args = _core_train_args(shape=(1, 3))
    with raises(ValueError, "Expected more than 1 value per channel when training"):
        _call_core("forward_train", args)
    # An empty batch is no error: NaN statistics, the running statistics untouched.
    args = _core_train_args(shape=(0, 3))
    running = args["running_mean"].copy(), args["running_var"].copy()
    _core.forward_train(**args)
    assert np.isnan(args["save_mean"]).all()
    assert np.array_equal(args["running_mean"], running[0])
    assert np.array_equal(args["running_var"], running[1])


def test_core_optional_arguments_may_be_none_but_required_ones_may_not():
    args = _core_train_args()
    for k in ("weight", "bias", "running_mean", "running_var"):
        args[k] = None
    _core.forward_train(**args)  # all four optional
    for func_name, required in (("forward_train", ["save_mean", "save_invstd"]),
                                ("forward_eval", ["running_mean", "running_var", "save_mean",
                                                  "save_invstd"]),
                                ("backward", ["x", "save_mean", "save_invstd", "grad_weight",
                                              "grad_bias"])):
        for k in required:
            call = CORE_FUNCS[func_name][1]()
            call[k] = None
            with raises(TypeError, f"{k}: expected a numpy.ndarray, got NoneType"):
                _call_core(func_name, call)


def test_core_float16_needs_float32_parameters():
    args = _core_train_args(np.float16)
    with raises(TypeError, "weight: expected dtype float32, got float16"):
        _call_core("forward_train", args)
    for k in ("weight", "bias", "running_mean", "running_var", "save_mean", "save_invstd"):
        args[k] = args[k].astype(np.float32)
    _core.forward_train(**args)


# -- every malformed value of every argument -------------------------------------------------------


def _core_args(func, dtype=F32):
    shape, c = (4, 3), 3
    p = F32 if dtype == F16 else dtype
    rng = np.random.default_rng(83)
    x = rng.standard_normal(shape).astype(dtype)
    if func == "forward_train":
        return dict(x=x, out=np.full(shape, 9, dtype), weight=np.ones(c, p), bias=np.zeros(c, p),
                    running_mean=np.zeros(c, p), running_var=np.ones(c, p), axis=1, eps=1e-5,
                    momentum=0.1, save_mean=np.full(c, 9, p), save_invstd=np.full(c, 9, p))
    if func == "forward_eval":
        return dict(x=x, out=np.full(shape, 9, dtype), weight=np.ones(c, p), bias=np.zeros(c, p),
                    running_mean=np.zeros(c, p), running_var=np.ones(c, p), axis=1, eps=1e-5,
                    save_mean=np.full(c, 9, p), save_invstd=np.full(c, 9, p))
    return dict(dy=rng.standard_normal(shape).astype(dtype), x=x, out=np.full(shape, 9, dtype),
                save_mean=np.zeros(c, p), save_invstd=np.ones(c, p), weight=np.ones(c, p), axis=1,
                training=True, grad_weight=np.full(c, 9, p), grad_bias=np.full(c, 9, p))


_CORE_OPTIONAL = {"forward_train": {"weight", "bias", "running_mean", "running_var"},
                  "forward_eval": {"weight", "bias"}, "backward": {"weight"}}
_CORE_OUTPUTS = {"forward_train": {"out", "running_mean", "running_var", "save_mean",
                                   "save_invstd"},
                 "forward_eval": {"out", "save_mean", "save_invstd"},
                 "backward": {"out", "grad_weight", "grad_bias"}}


@pytest.mark.parametrize("dtype", [F32, F16, F64], ids=case_id)
@pytest.mark.parametrize("func", ["forward_train", "forward_eval", "backward"])
def test_core_kernels_reject_malformed_arguments(func, dtype):
    """bnc._core called directly: every array argument with every bad value, bad axes, eps and
    booleans. Nothing may be written, nothing may crash."""
    fn = getattr(_core, func)
    base = _core_args(func, dtype)
    failures = []
    with collect_failures(failures):
        for arg, value0 in base.items():
            if not isinstance(value0, np.ndarray):
                continue
            bad = malformed(value0.shape, value0.dtype.type, required=arg not in
                            _CORE_OPTIONAL[func], output=arg in _CORE_OUTPUTS[func])
            # every array must be C-contiguous in _core, inputs too
            if arg not in _CORE_OUTPUTS[func]:
                bad.append(("negative-stride",
                            np.ones((value0.shape[0] * 2,) + value0.shape[1:],
                                    value0.dtype)[::-2]))
            # an output aliasing any other argument
            if arg in _CORE_OUTPUTS[func]:
                bad += [(f"alias-{k}", v) for k, v in base.items()
                        if k != arg and isinstance(v, np.ndarray) and v.shape == value0.shape]
            for name, value in bad:
                args = _core_args(func, dtype)
                args[arg] = value if not name.startswith("alias-") else args[name[6:]]
                arrays = [v for v in args.values() if isinstance(v, np.ndarray)]
                before = snapshot(*arrays)
                failures.append(rejects(lambda: fn(**args), f"{func} {arg}={name}"))
                if not untouched(arrays, before):
                    failures.append(f"{func} {arg}={name}: an argument was modified")
        for axis in (2, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 64, 2 ** 70, 1.5, "1", None):
            args = _core_args(func, dtype)
            args["axis"] = axis
            failures.append(rejects(lambda: fn(**args), f"{func} axis={axis!r}"))
        if func != "backward":
            # Only what cannot be a double: eps's value is the functional layer's to check.
            for eps in ("1e-5", None, 1e-5j):
                args = _core_args(func, dtype)
                args["eps"] = eps
                failures.append(rejects(lambda: fn(**args), f"{func} eps={eps!r}"))
        if func == "forward_train":
            for momentum in ("0.1", None, 0.1j, 10 ** 400):
                args = _core_args(func, dtype)
                args["momentum"] = momentum
                failures.append(rejects(lambda: fn(**args), f"{func} momentum={momentum!r}"))
        else:
            if func == "backward":
                args = _core_args(func, dtype)
                args["training"] = "yes"
                failures.append(rejects(lambda: fn(**args), "backward training='yes'"))


@pytest.mark.parametrize("func", ["forward_train", "forward_eval"])
def test_non_finite_eps_and_momentum_rejected_before_any_write(func):
    """Scalars are the functional layer's to check (bnc._core checks buffers only): eps=inf and
    momentum=nan/inf are refused by bnc.batch_norm_forward -- its fast path included, which hands
    well-formed arrays straight to the binding -- before anything is written."""
    training = func == "forward_train"
    cases = [("eps", float("inf")), ("eps", float("nan")), ("eps", -1.0)]
    if training:
        cases += [("momentum", float("nan")), ("momentum", float("inf"))]
    for arg, value in cases:
        args = _core_args(func)
        arrays = [v for v in args.values() if isinstance(v, np.ndarray)]
        before = snapshot(*arrays)
        kwargs = {"eps": args["eps"], "momentum": 0.1, arg: value}
        with pytest.raises(ValueError, match=arg):
            bnc.batch_norm_forward(args["x"], args["weight"], args["bias"], args["running_mean"],
                                   args["running_var"], training=training, out=args["out"],
                                   **kwargs)
        assert untouched(arrays, before), f"{arg}={value}: an argument was modified"


def test_core_copy_select_isa_set_num_threads_reject_malformed_arguments(restore_num_threads):
    active = _core.active_isa()
    threads = bnc.get_num_threads()
    failures = []
    try:
        with collect_failures(failures):
            src, dst = np.arange(12.0), np.zeros(12)
            ro = np.zeros(12)
            ro.flags.writeable = False
            cases = [
                (None, dst), (src, None), ([1.0] * 12, dst), (src, [0.0] * 12), ("abc", dst),
                (src, "abc"), (3.0, dst), (src[::-1], dst), (src, np.zeros(24)[::2]),
                (src, ro), (src, np.zeros(11)), (src, np.zeros(13)), (np.zeros((3, 4)).T, dst),
                (src, src), (src[:8], src[4:]),
            ]
            for i, (s, d) in enumerate(cases):
                failures.append(rejects(lambda: _core.copy(s, d), f"copy case {i}"))
            assert np.array_equal(dst, np.zeros(12)) and np.array_equal(src, np.arange(12.0))
            for isa in (None, 1, 1.5, "foo", "AVX2", " avx2", "avx2 ", "x" * 10_000, "avx2\0",
                        ["avx2"]):
                failures.append(rejects(lambda: _core.select_isa(isa), f"select_isa({isa!r})"))
                assert _core.active_isa() == active
            for isa in ("avx512", "avx2"):
                if isa not in _core.available_isas():
                    failures.append(rejects(lambda: _core.select_isa(isa),
                                            f"select_isa({isa!r}) on a CPU without it"))
            for n in (0, -1, -(2 ** 31), 2 ** 31, 2 ** 40, "2", None, 2.5, [2]):
                failures.append(rejects(lambda: _core.set_num_threads(n),
                                        f"_core.set_num_threads({n!r})"))
                failures.append(rejects(lambda: bnc.set_num_threads(n),
                                        f"bnc.set_num_threads({n!r})"))
                assert bnc.get_num_threads() == threads
            for n in ("1", None, 1.0):
                failures.append(rejects(lambda: _core._set_stream_threshold_bytes(n),
                                        f"_set_stream_threshold_bytes({n!r})"))
    finally:
        _core.select_isa(active)
        _core._set_stream_threshold_bytes(-1)


def test_core_copy_rejects_object_arrays():
    """copy moves raw bytes: on object arrays (or structured ones with object fields) it would
    copy PyObject pointers without reference counts (a use-after-free once the source dies).
    The arrays here hold only None (or 0), so a copy that is wrongly accepted does no harm to
    this process."""
    accepted = []
    for src, dst in ((np.full(4, None, object), np.full(4, None, object)),
                     (np.full(4, None, object), np.zeros(4, np.int64)),
                     (np.zeros(4, np.int64), np.full(4, None, object)),
                     (np.zeros(4, [("a", object)]), np.zeros(4, [("a", object)]))):
        try:
            _core.copy(src, dst)
        except (TypeError, ValueError):
            continue
        accepted.append(f"{src.dtype} -> {dst.dtype}")
    assert not accepted, (
        f"BUG: bnc._core.copy accepts object arrays ({accepted}); it copies the PyObject "
        "pointers byte-wise without reference counting: src = np.array([[1.5], None], "
        "dtype=object)[:1]; dst = np.empty(1, object); _core.copy(src, dst); del src; "
        "reuse = [[0] for _ in range(100)]; dst[0] -> shows `reuse` (use after free)")
