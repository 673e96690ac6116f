"""``python -m bnc bench torch``: bnc.torch's modules against torch.nn's, through autograd.

Each layer runs as a model runs it: a training step (forward with the running-statistics update,
then backward through autograd into a fresh input gradient and the weight and bias gradients),
and an inference forward under torch.no_grad(); bnc.torch.BatchNormXd and torch.nn.BatchNormXd
interleaved, repeat after repeat, medians, at the same thread count. Outputs are allocated by the
calls, as in a model. Then the bridge's own cost per call (a tiny tensor through bnc.torch against
the same NumPy calls) and a training step of a small ResNet with and without convert_batchnorm.
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import bnc
import bnc.torch as bt

from .bench import _time_interleaved

# (name, shape, memory format)
LAYERS = [
    ("RN50", (32, 64, 112, 112), "nchw"), ("RN50", (32, 64, 112, 112), "nhwc"),
    ("RN50", (32, 256, 56, 56), "nchw"), ("RN50", (32, 256, 56, 56), "nhwc"),
    ("RN50", (32, 512, 28, 28), "nchw"), ("RN50", (32, 512, 28, 28), "nhwc"),
    ("RN50", (32, 1024, 14, 14), "nchw"), ("RN50", (32, 1024, 14, 14), "nhwc"),
    ("RN50", (32, 2048, 7, 7), "nchw"), ("RN50", (32, 2048, 7, 7), "nhwc"),
    ("BN1d", (256, 1024), "nchw"),
    ("BN2d", (2048, 64, 1, 1), "nchw"),
]
_CLASSES = {2: (nn.BatchNorm1d, bt.BatchNorm1d), 4: (nn.BatchNorm2d, bt.BatchNorm2d)}


def _median_interleaved(fns: Dict[str, Callable[[], object]], repeats: int,
                        budget_s: float) -> Dict[str, float]:
    return _time_interleaved(fns, {name: repeats for name in fns}, budget_s)


def _layer_calls(shape, fmt):
    torch_cls, bnc_cls = _CLASSES[len(shape)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if fmt == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).contiguous(
        memory_format=torch.channels_last if fmt == "nhwc" else torch.contiguous_format)
    modules = {"torch": torch_cls(shape[1]), "bnc": bnc_cls(shape[1])}

    def train(m):
        def step():
            xi = x.detach().requires_grad_()
            m.zero_grad(set_to_none=True)
            m(xi).backward(dy)
            return xi.grad
        return step

    def infer(m):
        def step():
            with torch.no_grad():
                return m(x)
        return step

    for m in modules.values():
        m.train()
    return ({k: train(m) for k, m in modules.items()},
            {k: infer(m) for k, m in modules.items()}, modules)


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def run_layers(quick: bool) -> List[dict]:
    rows = []
    for name, shape, fmt in LAYERS:
        train, infer, modules = _layer_calls(shape, fmt)
        t_train = _median_interleaved(train, 3 if quick else 7, 0.3 if quick else 1.5)
        for m in modules.values():
            m.eval()
        t_eval = _median_interleaved(infer, 3 if quick else 7, 0.2 if quick else 1.0)
        rows.append({"layer": name, "shape": shape, "format": fmt,
                     "train_torch_ms": t_train["torch"] * 1e3, "train_bnc_ms": t_train["bnc"] * 1e3,
                     "eval_torch_ms": t_eval["torch"] * 1e3, "eval_bnc_ms": t_eval["bnc"] * 1e3})
    return rows


def bridge_overhead() -> Dict[str, float]:
    """Microseconds per training step (forward + backward) on a (2, 8) tensor: bnc.torch's
    module, the bare NumPy calls it makes, and torch's module."""
    x = torch.randn(2, 8)
    dy = torch.randn(2, 8)
    ours, theirs = bt.BatchNorm1d(8), nn.BatchNorm1d(8)

    def module_step(m):
        def step():
            xi = x.detach().requires_grad_()
            m(xi).backward(dy)
        return step

    xn, dyn = x.numpy(), dy.numpy()
    w, b = ours.weight.detach().numpy().copy(), ours.bias.detach().numpy().copy()
    rm, rv = ours.running_mean.numpy().copy(), ours.running_var.numpy().copy()

    def numpy_step():
        y, m, s = bnc.batch_norm_forward(xn, w, b, rm, rv)
        bnc.batch_norm_backward(dyn, xn, m, s, w)

    t = _median_interleaved({"bnc.torch": module_step(ours), "numpy": numpy_step,
                             "torch": module_step(theirs)}, 200, 1.0)
    return {k: v * 1e6 for k, v in t.items()}


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def small_resnet() -> nn.Module:
    """A ResNet-18-like net for 64x64 input (basic blocks, downsampling shortcuts)."""
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)):
        layers.append(_Block(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def training_step(quick: bool, channels_last: bool) -> Dict[str, float]:
    """Milliseconds per SGD step of small_resnet on a (32, 3, 64, 64) batch."""
    torch.manual_seed(0)
    plain = small_resnet()
    converted = bt.convert_batchnorm(copy.deepcopy(plain))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(32, 3, 64, 64).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (32,))
    steps = {}
    for name, model in (("torch", plain), ("bnc", converted)):
        model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
        steps[name] = step
    t = _median_interleaved(steps, 3 if quick else 7, 2.0 if quick else 10.0)
    return {k: v * 1e3 for k, v in t.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnc bench torch",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=bnc.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    bnc.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"bnc {bnc.__version__} ({bnc.config()['isa']}), torch {torch.__version__}, "
          f"threads {args.threads}")
    print("\n| layer | shape | format | train torch ms | train bnc ms | vs torch "
          "| eval torch ms | eval bnc ms | vs torch |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = run_layers(args.quick)
    for r in rows:
        print(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['format']} "
              f"| {r['train_torch_ms']:.3f} | {r['train_bnc_ms']:.3f} "
              f"| {r['train_torch_ms'] / r['train_bnc_ms']:.2f}x "
              f"| {r['eval_torch_ms']:.3f} | {r['eval_bnc_ms']:.3f} "
              f"| {r['eval_torch_ms'] / r['eval_bnc_ms']:.2f}x |")
    train = [r["train_torch_ms"] / r["train_bnc_ms"] for r in rows]
    infer = [r["eval_torch_ms"] / r["eval_bnc_ms"] for r in rows]
    print(f"\ntraining step (forward + backward) vs torch: geometric mean {_geomean(train):.2f}x, "
          f"slowest {min(train):.2f}x; inference: geometric mean {_geomean(infer):.2f}x, "
          f"slowest {min(infer):.2f}x")
    o = bridge_overhead()
    print(f"\nper-call cost, training step on a (2, 8) tensor: bnc.torch {o['bnc.torch']:.1f} us, "
          f"the same NumPy calls {o['numpy']:.1f} us (bridge: {o['bnc.torch'] - o['numpy']:.1f} us)"
          f", torch {o['torch']:.1f} us")
    for last in (False, True):
        t = training_step(args.quick, last)
        print(f"small ResNet SGD step, (32, 3, 64, 64) {'channels_last' if last else 'NCHW'}: "
              f"torch {t['torch']:.1f} ms, with convert_batchnorm {t['bnc']:.1f} ms "
              f"({t['torch'] / t['bnc']:.2f}x)")
    return 0
