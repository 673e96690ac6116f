"""bnc.fold_batch_norm and the modules' fold_into: the folded layer equals the layer followed by the
inference BatchNorm (torch's composites, float64), for convolutions (grouped too), transposed
convolutions (grouped: where torch's fuse_conv_bn_weights is wrong) and linear layers; nothing
given is modified; bad arguments get clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnc

F64 = torch.float64


def _bn(channels, seed):
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm1d(channels).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=F64))
        bn.running_var.copy_(torch.rand(channels, generator=g, dtype=F64) + 0.2)
        bn.weight.copy_(torch.randn(channels, generator=g, dtype=F64))
        bn.bias.copy_(torch.randn(channels, generator=g, dtype=F64))
    return bn


def _numpy(t):
    return None if t is None else t.detach().numpy().copy()


CASES = [
    ("conv", lambda: torch.nn.Conv2d(6, 8, 3, groups=1), (2, 6, 7, 7)),
    ("conv", lambda: torch.nn.Conv2d(6, 8, 3, groups=2, bias=False), (2, 6, 7, 7)),
    ("conv", lambda: torch.nn.Conv1d(4, 4, 3, groups=4), (2, 4, 9)),
    ("conv", lambda: torch.nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4)),
    ("conv_transpose", lambda: torch.nn.ConvTranspose2d(6, 8, 3, groups=1), (2, 6, 5, 5)),
    ("conv_transpose", lambda: torch.nn.ConvTranspose2d(6, 8, 3, groups=2), (2, 6, 5, 5)),
    ("conv_transpose", lambda: torch.nn.ConvTranspose1d(6, 9, 2, groups=3, bias=False), (2, 6, 5)),
    ("linear", lambda: torch.nn.Linear(5, 7), (4, 5)),
    ("linear", lambda: torch.nn.Linear(5, 7, bias=False), (4, 5)),
]


@pytest.mark.parametrize("layer,make,shape", CASES, ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_folded_layer_equals_layer_then_batchnorm(layer, make, shape, dtype):
    torch.manual_seed(0)
    lin = make().double()
    out_channels = lin.out_features if layer == "linear" else lin.out_channels
    bn = _bn(out_channels, 1)
    x = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        z = lin(x)
        want = bn(z if z.dim() > 2 else z).numpy() if z.dim() <= 3 else \
            bn(z.reshape(z.shape[0], z.shape[1], -1)).reshape(z.shape).numpy()
    weight = _numpy(lin.weight).astype(dtype)
    bias = None if lin.bias is None else _numpy(lin.bias).astype(dtype)
    given = [a.copy() for a in (weight, bias) if a is not None]
    groups = getattr(lin, "groups", 1)
    w, b = bnc.fold_batch_norm(weight, bias, _numpy(bn.running_mean), _numpy(bn.running_var),
                               _numpy(bn.weight), _numpy(bn.bias), bn.eps, layer=layer,
                               groups=groups)
    assert w.dtype == dtype and b.dtype == dtype and w.shape == weight.shape
    assert all(np.array_equal(a, g) for a, g in zip((weight, bias), given))
    folded = make().double()
    with torch.no_grad():
        folded.weight.copy_(torch.from_numpy(w.astype(np.float64)))
        folded.bias = torch.nn.Parameter(torch.from_numpy(b.astype(np.float64)))
        got = folded(x).numpy()
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_grouped_transposed_convolution_where_torch_fails():
    """torch.nn.utils.fusion.fuse_conv_bn_weights(transpose=True) scales axis 1 of the weight as
    if groups were 1: with groups=2 it raises (pytorch #180995); bnc folds it right."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    torch.manual_seed(3)
    conv = torch.nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    bn = _bn(6, 4)
    with pytest.raises(RuntimeError, match="must match the size"):
        fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                             bn.weight, bn.bias, transpose=True)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    with torch.no_grad():
        want = bn(conv(x).reshape(2, 6, -1)).reshape(2, 6, 7, 7)
    w, b = bnc.fold_batch_norm(_numpy(conv.weight), _numpy(conv.bias), _numpy(bn.running_mean),
                               _numpy(bn.running_var), _numpy(bn.weight), _numpy(bn.bias),
                               layer="conv_transpose", groups=2)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
        conv.bias.copy_(torch.from_numpy(b))
        torch.testing.assert_close(conv(x), want, rtol=1e-12, atol=1e-12)


def test_module_fold_into():
    m = bnc.BatchNorm2d(4, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((8, 4, 3, 3)) * 2 + 1
    m(x)
    m.eval()
    weight = np.random.default_rng(1).standard_normal((4, 2, 1, 1))
    w, b = m.fold_into(weight, None)
    z = np.einsum("oi,nihw->nohw", weight[:, :, 0, 0], x[:, :2])
    folded = np.einsum("oi,nihw->nohw", w[:, :, 0, 0], x[:, :2]) + b[None, :, None, None]
    np.testing.assert_allclose(folded, m(z), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="fold_into: expected running statistics"):
        bnc.BatchNorm2d(4, track_running_stats=False).fold_into(weight)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(layer="dense"), ValueError, "layer: expected one of"),
    (dict(groups=0), ValueError, "groups: expected a positive int"),
    (dict(groups=3), ValueError, "divisible by groups"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(running_mean=np.zeros(5)), ValueError, r"running_mean: expected shape \(4,\)"),
    (dict(bias=[1, 2, 3, 4]), TypeError, "bias: expected a numpy.ndarray or None, got list"),
    (dict(weight=np.zeros((4, 2, 3, 3), np.int32)), TypeError, "weight: expected a float dtype"),
    (dict(weight=np.zeros((4, 2)), layer="conv"), ValueError, "3 or more dimensions"),
    (dict(layer="linear"), ValueError, r"expected \(out, in\)"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(weight=np.zeros((4, 2, 3, 3)), bias=None, running_mean=np.zeros(4),
                running_var=np.ones(4))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        bnc.fold_batch_norm(**args)
