"""bnc.torch against torch's own BatchNorm: modules, functional, convert_batchnorm, autograd,
torch.compile, memory formats, dtypes, and the fallbacks.

Every case runs the same steps on a torch.nn.BatchNormXd and on bnc's, from the same state, and
compares y, the input/weight/bias gradients, the running statistics and num_batches_tracked after
each step; inputs are contiguous, channels-last or strided.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings

import pytest
import torch

import bnc.torch as bt

torch.manual_seed(0)

CLASSES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}
SHAPES = [(16, 5), (6, 5, 7), (4, 5, 6, 3), (3, 5, 2, 4, 3), (2, 4096)]
CONFIGS = {
    "default": dict(),
    "cma": dict(momentum=None),
    "no-affine": dict(affine=False, momentum=0.3),
    "no-bias": dict(bias=False),
    "no-tracking": dict(track_running_stats=False),
    "eps-momentum": dict(eps=1e-3, momentum=0.01),
}
# (input dtype, module dtype) and tolerances (rtol, atol) on y and gradients. The reference is
# torch's own batch norm in float64 on the same numbers (rounded to the tested dtype): torch's
# float32 loses digits where bnc does not (two values per channel, close together: 4e-4 of y),
# and torch's all-half batch norm normalizes around the mean rounded to half (its saved statistics
# are half), which costs it up to ~5% of a weight gradient.
DTYPES = {
    "f32": (torch.float32, torch.float32, 2e-5, 2e-5),
    "f64": (torch.float64, torch.float64, 1e-10, 1e-12),
    "f16-in-f32": (torch.float16, torch.float32, 2e-3, 4e-3),
    "f16": (torch.float16, torch.float16, 2e-3, 4e-3),
    "bf16-in-f32": (torch.bfloat16, torch.float32, 1.6e-2, 3e-2),
    "bf16": (torch.bfloat16, torch.bfloat16, 1.6e-2, 3e-2),
}


def make_input(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other element of a wider last axis
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)
        x = 3 + 2 * wide[..., ::2]
    else:
        x = 3 + 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4
                         else torch.channels_last_3d)
    return x


def module_pair(shape, config, module_dtype, seed=0, ref_dtype=torch.float64):
    """(torch's module in ref_dtype, bnc's in module_dtype), with the same state."""
    cls = CLASSES[len(shape)]
    ours = bt.convert_batchnorm(cls(shape[1], **config).to(module_dtype))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
        if ours.bias is not None:
            ours.bias.copy_(torch.randn(shape[1], generator=g))
    ref = cls(shape[1], **config).to(ref_dtype)
    ref.load_state_dict(ours.state_dict())
    return ref, ours


def _mirror(ref, ours):
    """The float64 torch module's state after a step set to ours' (rounded) numbers: both start
    every step from the same numbers."""
    with torch.no_grad():
        for name, b in ref.named_buffers():
            if b.is_floating_point():
                b.copy_(getattr(ours, name))


def assert_close(got, want, rtol, atol, what):
    assert (got is None) == (want is None), what
    if got is None:
        return
    if want.is_floating_point():
        want = want.to(got.dtype)  # torch's float64 numbers, rounded as ours are
    if callable(atol):
        atol = atol(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, torch's {want.dtype}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def compare_steps(ref, ours, shape, layout, in_dtype, rtol, atol, grads=("x", "w", "b"),
                  steps=(True, True, False), ref_dtype=None):
    """Training or eval steps (True = train) on both modules; every output and state compared.
    torch's module gets the input in ref_dtype (default: the input's dtype)."""
    ref_dtype = ref_dtype or in_dtype
    # Two values per channel: dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)) cancels all but
    # ~1e-4 of its terms where the two are close (invstd up to 1 / sqrt(eps)), and the rounding of
    # float32 statistics (torch's in float32 and bnc's alike: 1.4e-4 of the largest dx) shows.
    grad_rtol, grad_atol = rtol, atol
    if shape[0] * math.prod(shape[2:]) <= 2 and in_dtype != torch.float64:
        grad_rtol, grad_atol = 0.0, lambda want: max(atol, 5e-4 * float(want.abs().max()))
    for step, train in enumerate(steps):
        ref.train(train)
        ours.train(train)
        x = make_input(shape, layout, in_dtype, seed=step)
        dy = make_input(shape, "contiguous", in_dtype, seed=50 + step)
        xs = [x.to(ref_dtype).clone(memory_format=torch.preserve_format),
              x.clone(memory_format=torch.preserve_format)]
        for xi in xs:
            xi.requires_grad_("x" in grads)
        for m in (ref, ours):
            for name in ("weight", "bias"):
                p = getattr(m, name)
                if p is not None:
                    p.requires_grad_(name[0] in grads)
                    p.grad = None
        y_ref, y = ref(xs[0]), ours(xs[1])
        assert_close(y, y_ref, rtol, atol, f"step {step}: y")
        assert y.stride() == y_ref.stride(), f"step {step}: strides"
        if grads:
            y_ref.backward(dy.to(ref_dtype))
            y.backward(dy)
            assert_close(xs[1].grad, xs[0].grad, grad_rtol, grad_atol, f"step {step}: grad_input")
            for name in ("weight", "bias"):
                p_ref, p = getattr(ref, name), getattr(ours, name)
                if p_ref is not None:
                    assert_close(p.grad, p_ref.grad, grad_rtol,
                                 grad_atol if callable(grad_atol) else 10 * grad_atol,
                                 f"step {step}: {name}.grad")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(ours, name), getattr(ref, name), rtol, atol,
                         f"step {step}: {name}")
        _mirror(ref, ours)


def _layouts(shape):
    return ["contiguous", "strided"] + (["channels_last"] if len(shape) >= 4 else [])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape,layout", [(s, lay) for s in SHAPES for lay in _layouts(s)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_module_matches_torch(shape, layout, config, dtype):
    in_dtype, module_dtype, rtol, atol = DTYPES[dtype]
    ref, ours = module_pair(shape, CONFIGS[config], module_dtype)
    compare_steps(ref, ours, shape, layout, in_dtype, rtol, atol, ref_dtype=torch.float64)


@pytest.mark.parametrize("grads", [(), ("x",), ("w",), ("b",), ("w", "b"), ("x", "b")],
                         ids=lambda g: "+".join(g) or "none")
@pytest.mark.parametrize("shape,layout", [((6, 5, 7), "contiguous"),
                                          ((4, 5, 6, 3), "channels_last")], ids=str)
def test_requires_grad_on_any_subset(shape, layout, grads):
    ref, ours = module_pair(shape, {}, torch.float32)
    compare_steps(ref, ours, shape, layout, torch.float32, 2e-5, 2e-5, grads=grads,
                  ref_dtype=torch.float64)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(context):
    shape = (4, 5, 6, 3)
    ref, ours = module_pair(shape, {}, torch.float32, ref_dtype=torch.float32)
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        x = make_input(shape, "channels_last", torch.float32, seed=int(train))
        with ctx():
            y_ref, y = ref(x), ours(x)
        assert not y.requires_grad
        assert_close(y, y_ref, 2e-5, 2e-5, f"{context}, train={train}: y")
        assert y.is_contiguous(memory_format=torch.channels_last)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(ours, name), getattr(ref, name), 2e-5, 2e-5, name)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_functional_matches_torch(training, affine):
    shape = (6, 5, 7)
    x = make_input(shape, "contiguous", torch.float64)
    w = torch.rand(5, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(5, dtype=torch.float64) if affine else None
    rm_ref, rv_ref = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 1
    rm, rv = rm_ref.clone(), rv_ref.clone()
    y_ref = torch.nn.functional.batch_norm(x, rm_ref, rv_ref, w, b, training, 0.2, 1e-4)
    y = bt.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-12, atol=1e-14)


def test_torch_errors_and_fallbacks():
    # one value per channel in training: torch's ValueError, with its message
    one = torch.randn(1, 5)
    with pytest.raises(ValueError) as ours:
        bt.BatchNorm1d(5)(one)
    with pytest.raises(ValueError) as theirs:
        torch.nn.BatchNorm1d(5)(one)
    assert str(ours.value) == str(theirs.value)
    # eval with no running statistics, mismatched parameters: torch's own errors
    x = torch.randn(4, 5)
    for args in [(x, None, None), (x, torch.zeros(3), torch.ones(3))]:
        with pytest.raises(RuntimeError) as theirs:
            torch.nn.functional.batch_norm(*args)
        with pytest.raises(type(theirs.value)):
            bt.batch_norm(*args)
    # float64 input into a float32 module: torch's implementation, torch's error
    ref, ours = module_pair((8, 5, 3), {}, torch.float32, ref_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="mixed dtype") as theirs:
        ref(torch.randn(8, 5, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
        ours(torch.randn(8, 5, 3, dtype=torch.float64))
    # a 6-D input: torch's implementation, the same numbers
    x = torch.randn(2, 3, 2, 2, 2, 2)
    torch.testing.assert_close(bt.batch_norm(x, None, None, training=True),
                               torch.nn.functional.batch_norm(x, None, None, training=True),
                               rtol=0, atol=0)


def test_empty_batch_matches_torch():
    ref, ours = module_pair((0, 5, 3), {}, torch.float32)
    x = torch.randn(0, 5, 3)
    torch.testing.assert_close(ours(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, name), getattr(ref, name), 0, 0, name)
    # the output's and the gradient's strides are torch's (NumPy gives empty arrays zero strides)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(0, 8, 4, 4).contiguous(memory_format=fmt).requires_grad_()
        y_ref = torch.nn.functional.batch_norm(x, torch.zeros(8), torch.ones(8), training=True)
        y = bt.batch_norm(x, torch.zeros(8), torch.ones(8), training=True)
        assert y.stride() == y_ref.stride()
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        (dx_ref,) = torch.autograd.grad(y_ref, x, torch.ones_like(y_ref))
        assert dx.stride() == dx_ref.stride()


@pytest.mark.parametrize("view", ["w_step", "crop", "crop_3d", "nchw_step"])
def test_strided_views_keep_torchs_memory_format(view):
    """A slice or crop of a channels-last tensor (not contiguous in any format) is computed, and
    its output and gradient made, channels-last, as torch reads its strides; of an NCHW one,
    contiguous."""
    cl, cl3 = torch.channels_last, torch.channels_last_3d
    x = {"w_step": torch.randn(4, 8, 6, 10).contiguous(memory_format=cl)[..., ::2],
         "crop": torch.randn(4, 8, 6, 10).contiguous(memory_format=cl)[:, :, 1:-1, 2:],
         "crop_3d": torch.randn(2, 8, 3, 4, 10).contiguous(memory_format=cl3)[..., 1:],
         "nchw_step": torch.randn(4, 8, 6, 10)[..., ::2]}[view]
    ours, ref = x.detach().requires_grad_(), x.detach().requires_grad_()
    y = bt.batch_norm(ours, None, None, training=True)
    y_ref = torch.nn.functional.batch_norm(ref, None, None, training=True)
    g = torch.randn_like(y_ref)
    (dx,) = torch.autograd.grad(y, ours, g)
    (dx_ref,) = torch.autograd.grad(y_ref, ref, g)
    assert y.stride() == y_ref.stride() and dx.stride() == dx_ref.stride()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_mixed_parameter_dtypes_raise_torchs_error(half):
    """Half input takes parameters all float32 or all of its dtype; torch refuses a mix, and so
    does bnc (by running torch's own), in training and eval, leaving the statistics alone."""
    x = torch.randn(4, 3, dtype=half)
    f32 = {"weight": torch.ones(3), "bias": torch.zeros(3),
           "running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    for mixed in ("weight", "running_mean"):
        for training in (True, False):
            kw = {k: v.to(half) if k == mixed else v.clone() for k, v in f32.items()}
            with pytest.raises(RuntimeError) as theirs:
                torch.nn.functional.batch_norm(x, training=training, **kw)
            before = {k: v.clone() for k, v in kw.items()}
            with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
                bt.batch_norm(x, training=training, **kw)
            for k, v in kw.items():
                assert torch.equal(v, before[k]), k
    # all float32, or all of the input's dtype: computed
    for dtype in (torch.float32, half):
        kw = {k: v.to(dtype) for k, v in f32.items()}
        y = bt.batch_norm(x, training=True, **kw)
        assert y.dtype == half


def test_non_finite_channel_keeps_its_running_statistics():
    """Beyond torch: a NaN channel leaves its running statistics alone, with a warning."""
    m = bt.BatchNorm1d(3)
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 of 3 channels"):
        y = m(x)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    assert m.running_mean[1] == 0 and m.running_var[1] == 1
    assert m.running_mean[0] != 0


def test_convert_batchnorm_shares_state_and_keeps_the_optimizer():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5),
                                            torch.nn.BatchNorm1d(5, momentum=None))
            self.keep = torch.nn.SyncBatchNorm(4)  # not a BatchNormXd: left alone

        def forward(self, x):
            return self.head(self.bn(self.conv(x)))

    model = Block()
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    keys, text = list(model.state_dict()), repr(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    converted = bt.convert_batchnorm(model)
    assert converted is model
    assert type(model.bn) is bt.BatchNorm2d and type(model.head[2]) is bt.BatchNorm1d
    assert isinstance(model.bn, torch.nn.BatchNorm2d)
    assert type(model.keep) is torch.nn.SyncBatchNorm
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert list(model.state_dict()) == keys and repr(model) == text
    before = model.bn.weight.detach().clone()
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(model.bn.weight.detach(), before)
    assert model.bn.num_batches_tracked.item() == 1
    single = bt.convert_batchnorm(torch.nn.BatchNorm3d(2).eval())
    assert type(single) is bt.BatchNorm3d and not single.training


def test_import_bnc_does_not_import_torch():
    code = "import sys, bnc; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gradcheck_float64_eager_and_custom_op():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64, generator=g).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for training in (True, False):
        for inp in (x, xl):
            assert torch.autograd.gradcheck(
                lambda x, w, b: bt.batch_norm(x, rm.clone(), rv.clone(), w, b, training),
                (inp, w, b))
            assert torch.autograd.gradcheck(
                lambda x, w, b: torch.ops.bnc.batch_norm(x, w, b, rm, rv, training, 1e-5, None,
                                                         False)[0],
                (inp, w, b))
            # the fused epilogue, differentiable in the residual too
            r = (0.5 * torch.randn(inp.shape, dtype=torch.float64, generator=g)).requires_grad_()
            assert torch.autograd.gradcheck(
                lambda x, w, b, r: bt.batch_norm(x, rm.clone(), rv.clone(), w, b, training,
                                                 residual=r, activation="relu"),
                (inp, w, b, r))
            assert torch.autograd.gradcheck(
                lambda x, w, b, r: torch.ops.bnc.batch_norm(x, w, b, rm, rv, training, 1e-5, r,
                                                            True)[0],
                (inp, w, b, r))
    for training in (True, False):
        for fused in ((None, False), (x.detach() * 0.5, True)):
            torch.library.opcheck(torch.ops.bnc.batch_norm.default,
                                  (x, w, b, rm, rv, training, 1e-5, *fused))
    torch.library.opcheck(torch.ops.bnc.update_running_stats_.default,
                          (rm.clone(), rv.clone(), rm, rv, 0.1, None))


def test_second_derivative_raises():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = bt.batch_norm(x, None, None, training=True)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside torch's Inductor
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_full_graph_matches_eager_torch(backend):
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 4, 3), torch.nn.BatchNorm2d(4, momentum=None),
            torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 8 * 8, affine=False))

    ref, ours = make(), bt.convert_batchnorm(make())
    compiled = torch.compile(ours, fullgraph=True, backend=backend)  # a graph break raises
    for step in range(3):
        train = step < 2
        ref.train(train)
        ours.train(train)
        x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(step))
        if step == 1:
            x = x.contiguous(memory_format=torch.channels_last)
        y_ref, y = ref(x), compiled(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        if train:
            y_ref.square().mean().backward()
            y.square().mean().backward()
            for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, name=name: f"{name}.grad: {m}")
        for (name, b_ref), b in zip(ref.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_warnings_do_not_leak():
    """An ordinary call warns nothing (pytest turns warnings into errors here anyway)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bt.BatchNorm2d(3)(torch.randn(2, 3, 4, 4)).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_relu_and_residual_match_the_torch_composite(dtype, layout, train):
    shape = (6, 5, 4, 3)
    ref, _ = module_pair(shape, {}, dtype)  # torch's in float64, on the same numbers
    ours = bt.BatchNorm2d(5, activation="relu").to(dtype)
    ours.load_state_dict(ref.state_dict())
    ref.train(train)
    ours.train(train)
    x = make_input(shape, layout, dtype)
    r = make_input(shape, "contiguous", dtype, seed=9) - 3  # the other layout: copied once
    dy = make_input(shape, layout, dtype, seed=8)
    leaves = [[t.detach().to(torch.float64, copy=True).requires_grad_() for t in (x, r)],
              [t.detach().clone().requires_grad_() for t in (x, r)]]
    y_ref = torch.relu(ref(leaves[0][0]) + leaves[0][1])
    y = ours(leaves[1][0], leaves[1][1])
    tol = dict(rtol=2e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref.to(dtype), **tol)
    y_ref.backward(dy.to(torch.float64))
    y.backward(dy)
    for a, b, what in ((leaves[1][0].grad, leaves[0][0].grad, "dx"),
                       (leaves[1][1].grad, leaves[0][1].grad, "d residual"),
                       (ours.weight.grad, ref.weight.grad, "d weight"),
                       (ours.bias.grad, ref.bias.grad, "d bias"),
                       (ours.running_var, ref.running_var, "running_var")):
        torch.testing.assert_close(a, b.to(a.dtype), **tol, msg=lambda m, what=what: f"{what}: {m}")


def test_convert_fuses_batchnorm_relu_in_sequential():
    torch.manual_seed(0)
    model = nn_model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    import copy

    ref = copy.deepcopy(nn_model)
    keys = list(model.state_dict())
    model = bt.convert_batchnorm(model, fuse_relu=True)
    assert model[1].activation == "relu" and type(model[2]) is torch.nn.Identity
    assert model[4].activation is None and list(model.state_dict()) == keys
    x = torch.randn(2, 3, 9, 9)
    out, out_ref = model(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="activation: expected None or 'relu'"):
        bt.BatchNorm1d(3, activation="gelu")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_compile_fused_module():
    torch._dynamo.reset()
    m = bt.BatchNorm2d(4, activation="relu")
    compiled = torch.compile(lambda x, r: m(x, r), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    r = torch.randn(3, 4, 5, 5, requires_grad=True)
    y = compiled(x, r)
    ref = bt.BatchNorm2d(4)
    torch.testing.assert_close(y, torch.relu(ref(x) + r), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert r.grad is not None and torch.equal(r.grad, (y > 0).float())
