"""``python -m bnc.smoke``: a quick self-check of the installed extension (used by CI on emulated
CPUs): the active ISA, and forward/backward on both loop families against NumPy in float64, and
the split-phase building blocks composed against the fused calls."""

from __future__ import annotations

import argparse
import sys

import numpy as np

import bnc
from bnc import numpy_baseline


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bnc.smoke")
    parser.add_argument("--expect-isa", help="fail unless this ISA path is the active one")
    args = parser.parse_args()
    config = bnc.config()
    print(f"bnc smoke: {config}")
    if args.expect_isa and config["isa"] != args.expect_isa:
        print(f"FAIL: expected ISA {args.expect_isa}, got {config['isa']}")
        return 1
    rng = np.random.default_rng(1)
    worst = 0.0
    for shape, axis in [((16, 37, 7, 7), 1), ((16, 7, 7, 37), -1), ((64, 19), 1), ((4, 3, 100), 1)]:
        for dtype, tol in [(np.float32, 1e-5), (np.float64, 1e-12)]:
            x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            y, mean, invstd = bnc.batch_norm_forward(x, axis=axis)
            dx, _, _ = bnc.batch_norm_backward(dy, x, mean, invstd, axis=axis)
            y_ref, m_ref, s_ref = numpy_baseline.forward(x.astype(np.float64), axis=axis)
            dx_ref, _, _ = numpy_baseline.backward(
                dy.astype(np.float64), x.astype(np.float64), m_ref, s_ref, axis=axis)
            # The split-phase blocks composed give the fused calls' results.
            count, s_mean, m2 = bnc.batch_norm_stats(x, axis=axis)
            y_split = bnc.batch_norm_elemt(x, s_mean, 1.0 / np.sqrt(m2 / count + 1e-5), axis=axis)
            sums = bnc.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
            dx_split = bnc.batch_norm_backward_elemt(dy, x, mean, invstd, None, *sums, count,
                                                     axis=axis)
            error = max(np.abs(y - y_ref).max(), np.abs(dx - dx_ref).max() / np.abs(dx_ref).max(),
                        np.abs(y_split - y_ref).max(),
                        np.abs(dx_split - dx_ref).max() / np.abs(dx_ref).max())
            worst = max(worst, error / tol)
            if not error <= tol:
                print(f"FAIL: {shape} axis={axis} {np.dtype(dtype)}: error {error:.2e} > {tol:.0e}")
                return 1
    print(f"OK (worst error {worst:.2f} of tolerance)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
