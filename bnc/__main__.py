"""``python -m bnc``: the demo (normalize a generated batch, check it, time it); ``bench`` for the
benchmark suite (``python -m bnc bench --help``)."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

import bnc

from . import numpy_baseline

DEMO_SHAPE = (32, 128, 28, 28)  # a mid-network ResNet activation, float32 (12.8 MB)


def _median_ms(fn: Callable[[], object], repeats: int = 9) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def demo() -> int:
    config = bnc.config()
    print(f"bnc {config['version']}: ISA {config['isa']} (available: "
          f"{', '.join(config['isa_available'])}), OpenMP {'on' if config['openmp'] else 'off'}, "
          f"{config['num_threads']} threads")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(DEMO_SHAPE, dtype=np.float32) * 3 + 2).astype(np.float32)
    dy = rng.standard_normal(DEMO_SHAPE, dtype=np.float32)
    channels = DEMO_SHAPE[1]
    bn = bnc.BatchNorm2d(channels)
    bn.weight[:] = rng.uniform(0.5, 1.5, channels)
    bn.bias[:] = rng.uniform(-0.5, 0.5, channels)

    y = bn(x)
    dx = bn.backward(dy)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    w64, b64 = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    y_ref, mean_ref, invstd_ref = numpy_baseline.forward(x64, w64, b64)
    dx_ref, gw_ref, gb_ref = numpy_baseline.backward(dy64, x64, mean_ref, invstd_ref, w64)
    errors = {
        "y": np.abs(y - y_ref).max() / np.abs(y_ref).max(),
        "dx": np.abs(dx - dx_ref).max() / np.abs(dx_ref).max(),
        "grad_weight": np.abs(bn.grad_weight - gw_ref).max() / np.abs(gw_ref).max(),
        "grad_bias": np.abs(bn.grad_bias - gb_ref).max() / np.abs(gb_ref).max(),
    }
    ok = all(e < 1e-5 for e in errors.values())
    print(f"BatchNorm2d({channels}) on a float32 batch {DEMO_SHAPE}: max error vs the float64 "
          "NumPy reference (relative to the largest value):")
    print("  " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) +
          ("  -> OK" if ok else "  -> MISMATCH"))

    out = np.empty_like(x)
    rows = [
        ("bnc", _median_ms(lambda: bnc.batch_norm_forward(x, bn.weight, bn.bias, out=out)),
         _median_ms(lambda: bn.backward(dy))),
        ("NumPy", _median_ms(lambda: numpy_baseline.forward(x, bn.weight, bn.bias), 3),
         _median_ms(lambda: numpy_baseline.backward(dy, x, mean_ref.astype(np.float32),
                                                    invstd_ref.astype(np.float32), bn.weight), 3)),
    ]
    try:
        import torch  # noqa: PLC0415

        torch.set_num_threads(config["num_threads"])
        tbn = torch.nn.BatchNorm2d(channels)
        tx = torch.from_numpy(x).requires_grad_()
        tdy = torch.from_numpy(dy)
        with torch.no_grad():
            torch_fwd = _median_ms(lambda: tbn(tx))
        ty = tbn(tx)
        torch_bwd = _median_ms(lambda: torch.autograd.grad(ty, tx, tdy, retain_graph=True))
        rows.append((f"PyTorch {torch.__version__}", torch_fwd, torch_bwd))
    except ImportError:
        pass
    print("median time (ms), training forward / backward, and as a multiple of bnc's:")
    bnc_fwd, bnc_bwd = rows[0][1], rows[0][2]
    for name, fwd, bwd in rows:
        print(f"  {name:<20} {fwd:8.2f} {bwd:8.2f}   ({fwd / bnc_fwd:.1f}x / {bwd / bnc_bwd:.1f}x)")
    return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "stack"]:
        from . import bench_stack  # noqa: PLC0415

        return bench_stack.main(argv[2:])
    if argv[:2] == ["bench", "sync"]:
        from . import bench_sync  # noqa: PLC0415

        return bench_sync.main(argv[2:])
    if argv[:2] == ["bench", "torch"]:
        from . import bench_torch  # noqa: PLC0415  (imports torch)

        return bench_torch.main(argv[2:])
    if argv and argv[0] == "bench":
        from . import bench  # noqa: PLC0415

        return bench.main(argv[1:])
    if argv:
        print("usage: python -m bnc [bench [torch | sync | stack] [options; --help]]",
              file=sys.stderr)
        return 2
    return demo()


if __name__ == "__main__":
    sys.exit(main())
