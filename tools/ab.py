"""A/B of builds of bnc._core in one process: the same calls on the same arrays, interleaved.

Usage (from anywhere; each path is a built ``_core*.so``, e.g. a cmake build dir of another
commit)::

    python tools/ab.py BEFORE.so AFTER.so [--repeats 21] [--filter TEXT]

Each build gets outputs of its own; the builds' order rotates from repeat to repeat; each figure
is a median. Prints each case's times and the ratios to the first build, and the geometric means.
A build loaded first can measure up to 10-15% slower on some cases in either role: run it twice
with the builds swapped and combine (docs/benchmarks.md, "A/B").
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import numpy as np

from bnc.bench import CASES


def _load(tag: str, path: str):
    spec = importlib.util.spec_from_file_location(f"ab_{tag}._core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.select_isa("")
    return module


def main() -> None:
    parser = argparse.ArgumentParser(prog="python tools/ab.py")
    parser.add_argument("builds", nargs="+",
                        help="paths of _core*.so builds, the first is the base")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--filter", default="", help="only cases whose name or shape contains it")
    args = parser.parse_args()
    builds = [_load(f"m{i}", p) for i, p in enumerate(args.builds)]
    print("ISA, threads:", [(b.active_isa(), b.get_num_threads()) for b in builds])
    rng = np.random.default_rng(0)
    ratios = {"train": [], "eval": [], "backward": []}
    for name, shape, axis, dtype in CASES:
        label = f"{name}{shape}" + ("" if dtype == "float32" else f"-{dtype}")
        if args.filter and args.filter not in label:
            continue
        x = (1 + rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        ax = axis % len(shape)
        c = shape[ax]
        pdtype = np.float32 if dtype == "float16" else dtype  # parameters of float16 data
        state = []
        for _ in builds:
            st = {k: np.zeros(c, pdtype) for k in ("b", "rm", "sm", "si", "gw", "gb")}
            st.update(out=np.zeros_like(x), w=np.ones(c, pdtype), rv=np.ones(c, pdtype))
            state.append(st)

        def call(i, op):
            m, s = builds[i], state[i]
            if op == "train":
                m.forward_train(x, s["out"], s["w"], s["b"], s["rm"], s["rv"], ax, 1e-5, 0.1,
                                s["sm"], s["si"])
            elif op == "eval":
                m.forward_eval(x, s["out"], s["w"], s["b"], s["rm"], s["rv"], ax, 1e-5, s["sm"],
                               s["si"])
            else:
                m.backward(dy, x, s["out"], s["sm"], s["si"], s["w"], ax, True, s["gw"], s["gb"])

        for op in ratios:
            times = [[] for _ in builds]
            for i in range(len(builds)):
                call(i, op)
            for r in range(args.repeats):
                order = list(range(len(builds)))
                order = order[r % len(order):] + order[:r % len(order)]
                for i in order:
                    t = time.perf_counter()
                    call(i, op)
                    times[i].append(time.perf_counter() - t)
            med = [float(np.median(t)) for t in times]
            ratios[op].append(med[-1] / med[0])
            print(f"{label:34s} {op:8s} " + " ".join(f"{m * 1e3:8.3f}" for m in med) + "  "
                  + " ".join(f"{m / med[0]:6.3f}" for m in med))
    for op, r in ratios.items():
        if r:
            print(f"geometric mean last/first {op}: {math.exp(np.mean(np.log(r))):.3f} "
                  f"(min {min(r):.3f}, max {max(r):.3f})")


if __name__ == "__main__":
    main()
