"""``python -m bnc bench stack``: BatchNorm as a network calls it -- a stack of layers.

Each layer is y = relu(BN(x) + residual) (the residual: the layer's own input, as in a residual
block's shortcut), or y = relu(BN(x)) without one. A training step runs the stack forward keeping
every output, then backward from the top (the top gradient, like the input, made once before
timing), each layer consuming its saved tensors and freeing them;
an inference pass runs it forward in eval mode, dropping each input once used. Every output is
allocated by the call, as user code allocates it. Implementations, interleaved, medians:

- bnc: one fused call per layer each way (``batch_norm_forward(..., residual=, activation=)``,
  ``batch_norm_backward(..., activation="relu", y=, return_residual_grad=)``), NumPy arrays;
- torch: eager PyTorch with its own ops (``native_batch_norm``, add, relu, ``threshold_backward``,
  ``native_batch_norm_backward``) on its own tensors;
- compiled: the same stack through autograd under ``torch.compile`` (Inductor), with
  ``--compile`` (compiling takes minutes on 2 cores).

"of bound": the stack's I/O bound over bnc's time. The bound moves each layer's compulsory
traffic -- forward: read x, write y (the residual is x); backward: read dy, x, y, write dx -- at the
bandwidth of bnc's multi-threaded copy of one activation, timed in the same interleaved run.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

import bnc

from . import _core
from .bench import _time_interleaved

LAYERS = 4
# Activation-sizes of compulsory traffic per layer (see the module's docstring).
TRAFFIC = {"train": 2 + 4, "infer": 2}
# (name, shape, channel axis, residual)
CASES = [
    ("RN50 56x56", (32, 256, 56, 56), 1, False),
    ("RN50 56x56 +res", (32, 256, 56, 56), 1, True),
    ("RN50-CL 56x56", (32, 56, 56, 256), -1, False),
    ("RN50-CL 56x56 +res", (32, 56, 56, 256), -1, True),
    ("RN50 14x14 +res", (32, 1024, 14, 14), 1, True),
    ("RN50-CL 14x14 +res", (32, 14, 14, 1024), -1, True),
    ("MLP", (1024, 4096), 1, False),
    ("MLP small", (256, 1024), 1, False),
]


def _median(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    return _time_interleaved(fns, {name: repeats for name in fns})


def _bnc_stack(x0, dy0, axis, residual, c):
    params = [(np.ones(c, np.float32), np.zeros(c, np.float32), np.zeros(c, np.float32),
               np.ones(c, np.float32)) for _ in range(LAYERS)]

    def train():
        saved, x = [], x0
        for w, b, rm, rv in params:
            y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, axis=axis,
                                             residual=x if residual else None,
                                             activation="relu")
            saved.append((x, y, m, s, w))
            x = y
        dy = dy0
        while saved:
            x, y, m, s, w = saved.pop()
            dx, gw, gb, *gr = bnc.batch_norm_backward(dy, x, m, s, w, axis=axis,
                                                      activation="relu", y=y,
                                                      return_residual_grad=residual)
            if residual:
                dx += gr[0]
            dy = dx
        return dy

    def infer():
        x = x0
        for w, b, rm, rv in params:
            x, _, _ = bnc.batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis,
                                             residual=x if residual else None,
                                             activation="relu")
        return x
    return train, infer


def _torch_stack(torch, x0, dy0, axis, residual, c):
    op = torch.ops.aten

    def as_torch(a):
        t = torch.from_numpy(a)
        if axis == -1:  # NHWC storage as torch's channels_last (N, C, H, W) view
            t = t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
        return t
    x_t, dy_t = as_torch(x0), as_torch(dy0)
    params = [(torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c))
              for _ in range(LAYERS)]

    def train():
        saved, x = [], x_t
        for w, b, rm, rv in params:
            t, m, s = op.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
            z = t + x if residual else t
            y = torch.relu(z)
            saved.append((x, y, m, s, w, rm, rv))
            x = y
        dy = dy_t
        while saved:
            x, y, m, s, w, rm, rv = saved.pop()
            g = op.threshold_backward(dy, y, 0)
            dx, _, _ = op.native_batch_norm_backward(g, x, w, rm, rv, m, s, True, 1e-5,
                                                     [True, True, True])
            dy = dx + g if residual else dx
        return dy

    def infer():
        x = x_t
        for w, b, rm, rv in params:
            t = op.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)[0]
            x = torch.relu(t + x if residual else t)
        return x
    return train, infer, x_t, dy_t, params


def _compiled_stack(torch, x_t, dy_t, residual, params):
    import torch.nn.functional as F

    def stack(x, training):
        for w, b, rm, rv in params:
            t = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
            x = torch.relu(t + x if residual else t)
        return x

    # Each case compiled afresh: dynamo caches by code object, and this one serves every case (its
    # recompile limit, 8, would send the later cases to eager silently).
    torch._dynamo.reset()
    compiled = torch.compile(stack)
    x_grad = x_t.detach().clone().requires_grad_()

    def train():
        y = compiled(x_grad, True)
        y.backward(dy_t)

    def infer():
        with torch.no_grad():
            return compiled(x_t, False)
    return train, infer


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnc bench stack",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=bnc.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="add torch.compile (Inductor)")
    parser.add_argument("--filter", default="")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    bnc.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    print(f"bnc {bnc.__version__} ({bnc.config()['isa']}), torch "
          f"{torch.__version__ if torch else 'not installed'}, threads {args.threads}, "
          f"{LAYERS} layers of relu(BN(x) [+ x]), float32")
    head = "| case | shape | step | bnc ms | of bound | torch ms | vs torch |"
    sep = "|---|---|---|---:|---:|---:|---:|"
    if args.compile:
        head += " compiled ms | vs compiled |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    ratios: Dict[str, List[float]] = {"train": [], "infer": []}
    for name, shape, axis, residual in CASES:
        if args.filter not in name:
            continue
        x0 = (1 + np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        dy0 = np.ones_like(x0)
        c = shape[axis]
        fns = {"train": {}, "infer": {}}
        fns["train"]["bnc"], fns["infer"]["bnc"] = _bnc_stack(x0, dy0, axis, residual, c)
        copy_dst = np.empty_like(x0)
        for step in fns:
            fns[step]["copy"] = lambda: _core.copy(x0, copy_dst)
        if torch is not None:
            t_train, t_infer, x_t, dy_t, params = _torch_stack(torch, x0, dy0, axis, residual, c)
            fns["train"]["torch"], fns["infer"]["torch"] = t_train, t_infer
            if args.compile:
                c_train, c_infer = _compiled_stack(torch, x_t, dy_t, residual, params)
                fns["train"]["compiled"], fns["infer"]["compiled"] = c_train, c_infer
        for step in ("train", "infer"):
            t = _median(fns[step], args.repeats)
            bound = LAYERS * TRAFFIC[step] * t["copy"] / 2  # a copy moves 2 activations
            line = (f"| {name} | {'x'.join(map(str, shape))} | {step} | {t['bnc'] * 1e3:.2f} "
                    f"| {bound / t['bnc']:.0%} |")
            if "torch" in t:
                ratios[step].append(t["torch"] / t["bnc"])
                line += f" {t['torch'] * 1e3:.2f} | {t['torch'] / t['bnc']:.2f}x |"
            if "compiled" in t:
                line += f" {t['compiled'] * 1e3:.2f} | {t['compiled'] / t['bnc']:.2f}x |"
            print(line, flush=True)
    for step, values in ratios.items():
        if values:
            geo = math.exp(sum(map(math.log, values)) / len(values))
            print(f"{step}: geometric mean {geo:.2f}x eager torch, slowest {min(values):.2f}x")
    return 0
