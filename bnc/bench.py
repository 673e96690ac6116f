"""``python -m bnc bench``: bnc vs PyTorch (when importable) vs plain NumPy, in one process.

For each case and operation (training forward with running-statistics update, inference forward,
backward) the implementations run interleaved, repeat after repeat, and each figure is the median.
Every implementation writes into preallocated outputs of its own (bnc's ``out=``, PyTorch's
``.out`` overloads, the copy's destination), so the figures are kernel time, not page faults; and
no implementation pays for another's: an output buffer shared with PyTorch, whose ordinary stores
leave it dirty in the cache, costs the next writer the write-back of those lines. Beside the
times: effective bandwidth (each input read once, each output written once) and the fraction of
the I/O bound, i.e. of the bandwidth of a multi-threaded copy of the same size measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import bnc

from . import _core, numpy_baseline

# (name, shape, channel axis, dtype)
Case = Tuple[str, Tuple[int, ...], int, str]


def _both_layouts(name: str, shape: Tuple[int, ...]) -> List[Case]:
    channels_last = (shape[0],) + shape[2:] + (shape[1],)
    return [(name, shape, 1, "float32"), (name + "-CL", channels_last, -1, "float32")]


CASES: List[Case] = [
    ("BN1d", (256, 1024), 1, "float32"),
    ("BN1d", (4096, 1024), 1, "float32"),
    ("BN1d", (32768, 256), 1, "float32"),
    ("BN1d", (1024, 4096), 1, "float32"),
    ("NCL", (64, 256, 128), 1, "float32"),
    *_both_layouts("RN50", (32, 64, 112, 112)),
    *_both_layouts("RN50", (32, 256, 56, 56)),
    *_both_layouts("RN50", (32, 512, 28, 28)),
    *_both_layouts("RN50", (32, 1024, 14, 14)),
    *_both_layouts("RN50", (32, 2048, 7, 7)),
    *_both_layouts("3D", (2, 64, 16, 56, 56)),
    ("BN1d", (4096, 1024), 1, "float64"),
    ("RN50", (32, 256, 56, 56), 1, "float64"),
]

OPERATIONS = ("train", "eval", "backward")
# tensor-sizes moved by each operation at the I/O bound: inputs read once, outputs written once
TRAFFIC = {"train": 2, "eval": 2, "backward": 3}
NUMPY_MAX_BYTES_QUICK = 16 << 20
MAX_REPEATS = 201


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _import_torch():
    try:
        import torch  # noqa: PLC0415

        return torch
    except ImportError:
        return None


class _Setup:
    """Inputs, outputs and the callables of every implementation for one case."""

    def __init__(self, case: Case, torch, with_numpy: bool) -> None:
        name, shape, axis, dtype = case
        rng = np.random.default_rng(0)
        x = (rng.standard_normal(shape, dtype=np.float64 if dtype == "float64" else np.float32)
             * 2 + 0.5).astype(dtype)
        dy = rng.standard_normal(shape, dtype=x.dtype)
        c = shape[axis]
        weight = rng.uniform(0.5, 1.5, c).astype(dtype)
        bias = rng.uniform(-0.5, 0.5, c).astype(dtype)
        running_mean = np.zeros(c, dtype)
        running_var = np.ones(c, dtype)
        y = np.empty_like(x)
        dx = np.empty_like(x)
        copy_dst = np.empty_like(x)
        _, save_mean, save_invstd = bnc.batch_norm_forward(x, weight, bias, axis=axis)
        self.nbytes = x.nbytes
        self.impls: Dict[str, Dict[str, Callable[[], object]]] = {}
        self.impls["copy"] = {op: (lambda: _core.copy(x, copy_dst)) for op in OPERATIONS}
        self.impls["bnc"] = {
            "train": lambda: bnc.batch_norm_forward(
                x, weight, bias, running_mean, running_var, training=True, axis=axis, out=y),
            "eval": lambda: bnc.batch_norm_forward(
                x, weight, bias, running_mean, running_var, training=False, axis=axis, out=y),
            "backward": lambda: bnc.batch_norm_backward(
                dy, x, save_mean, save_invstd, weight, axis=axis, out=dx),
        }
        if with_numpy:
            self.impls["numpy"] = {
                "train": lambda: numpy_baseline.forward(
                    x, weight, bias, running_mean, running_var, training=True, axis=axis),
                "eval": lambda: numpy_baseline.forward(
                    x, weight, bias, running_mean, running_var, training=False, axis=axis),
                "backward": lambda: numpy_baseline.backward(
                    dy, x, save_mean, save_invstd, weight, axis=axis),
            }
        if torch is not None:
            self.impls["torch"] = self._torch_impls(
                torch, x, dy, np.empty_like(x), np.empty_like(x), weight, bias, axis)

    @staticmethod
    def _torch_impls(torch, x, dy, y, dx, weight, bias, axis):
        def nchw(a: np.ndarray):
            t = torch.from_numpy(a)
            # channels-last: torch sees NCHW with channels_last strides
            if axis != 1 and a.ndim > 2:
                t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
            return t

        tx, tdy, ty, tdx = nchw(x), nchw(dy), nchw(y), nchw(dx)
        tw, tb = torch.from_numpy(weight.copy()), torch.from_numpy(bias.copy())
        trm, trv = torch.zeros_like(tw), torch.ones_like(tw)
        tsm, tsi = torch.empty_like(tw), torch.empty_like(tw)
        gw, gb = torch.empty_like(tw), torch.empty_like(tw)
        op = torch.ops.aten
        op.native_batch_norm.out(tx, tw, tb, None, None, True, 0.1, 1e-5,
                                 out=ty, save_mean=tsm, save_invstd=tsi)
        return {
            "train": lambda: op.native_batch_norm.out(
                tx, tw, tb, trm, trv, True, 0.1, 1e-5, out=ty, save_mean=tsm, save_invstd=tsi),
            "eval": lambda: op.native_batch_norm.out(
                tx, tw, tb, trm, trv, False, 0.1, 1e-5, out=ty, save_mean=tsm, save_invstd=tsi),
            "backward": lambda: op.native_batch_norm_backward.out(
                tdy, tx, tw, trm, trv, tsm, tsi, True, 1e-5, [True, True, True],
                out0=tdx, out1=gw, out2=gb),
        }


def _time_interleaved(
    impls: Dict[str, Callable[[], object]], repeats: Dict[str, int], budget_s: float = 0.0
) -> Dict[str, float]:
    """Median seconds per implementation; calls interleaved so drifts hit all alike.

    ``repeats`` is each implementation's number of calls at least; those without a cap of their
    own (all but NumPy) repeat further while the rounds fit in ``budget_s`` seconds (at most
    MAX_REPEATS): small, fast cases get many samples, so their medians are steadier.
    """
    for fn in impls.values():
        fn()  # warm-up: first touch of outputs, caches, thread pools
    round_s = 0.0  # one call of each implementation that may repeat further
    for name, fn in impls.items():
        if name == "numpy":
            continue
        start = time.perf_counter()
        fn()
        round_s += time.perf_counter() - start
    if budget_s > 0 and round_s > 0:
        more = min(MAX_REPEATS, int(budget_s / round_s))
        repeats = {name: max(n, more) if name != "numpy" else n for name, n in repeats.items()}
    samples: Dict[str, List[float]] = {name: [] for name in impls}
    for r in range(max(repeats.values())):
        for name, fn in impls.items():
            if r >= repeats[name]:
                continue
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in samples.items()}


def _geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def run(threads: int, quick: bool, cases: Optional[List[Case]] = None,
        progress=sys.stderr) -> dict:
    torch = _import_torch()
    bnc.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    cases = CASES if cases is None else cases
    repeats = 5 if quick else 11
    budget_s = 0.1 if quick else 0.4
    rows = []
    for index, case in enumerate(cases, 1):
        name, shape, axis, dtype = case
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        with_numpy = not quick or nbytes <= NUMPY_MAX_BYTES_QUICK
        if progress is not None:
            progress.write(f"\r[{index}/{len(cases)}] {name} {shape} {dtype}".ljust(70))
            progress.flush()
        setup = _Setup(case, torch, with_numpy)
        for op in OPERATIONS:
            impls = {impl: fns[op] for impl, fns in setup.impls.items()}
            counts = {impl: repeats for impl in impls}
            if "numpy" in counts:
                counts["numpy"] = min(repeats, 3)
            t = _time_interleaved(impls, counts, budget_s)
            copy_bandwidth = 2 * setup.nbytes / t["copy"]
            bound = TRAFFIC[op] * setup.nbytes / copy_bandwidth
            rows.append({
                "case": name, "shape": list(shape), "axis": axis, "dtype": dtype, "op": op,
                "mbytes": setup.nbytes / 1e6,
                "bnc_ms": t["bnc"] * 1e3,
                "torch_ms": t["torch"] * 1e3 if "torch" in t else None,
                "numpy_ms": t["numpy"] * 1e3 if "numpy" in t else None,
                "speedup_vs_torch": t["torch"] / t["bnc"] if "torch" in t else None,
                "gbps": TRAFFIC[op] * setup.nbytes / t["bnc"] / 1e9,
                "copy_gbps": copy_bandwidth / 1e9,
                "fraction_of_bound": bound / t["bnc"],
            })
        del setup
    if progress is not None:
        progress.write("\r".ljust(72) + "\r")
        progress.flush()
    return {"config": bnc.config(), "cpu": _cpu_model(), "threads": threads, "quick": quick,
            "torch": None if torch is None else torch.__version__, "numpy": np.__version__,
            "rows": rows, "summary": summarize(rows)}


def summarize(rows: List[dict]) -> dict:
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["case"], tuple(row["shape"]), row["dtype"]), {})[row["op"]] = row
    summary = {}
    if all(r["torch_ms"] is not None for r in rows):
        train_ratios = [
            (ops["train"]["torch_ms"] + ops["backward"]["torch_ms"])
            / (ops["train"]["bnc_ms"] + ops["backward"]["bnc_ms"]) for ops in by_case.values()]
        summary["train_fwd_bwd_geomean_vs_torch"] = _geomean(train_ratios)
        summary["eval_geomean_vs_torch"] = _geomean(
            [ops["eval"]["speedup_vs_torch"] for ops in by_case.values()])
        slowest = min(rows, key=lambda r: r["speedup_vs_torch"])
        summary["slowest_vs_torch"] = {
            "case": (f'{slowest["case"]} {tuple(slowest["shape"])} {slowest["dtype"]} '
                     f'{slowest["op"]}'),
            "speedup": slowest["speedup_vs_torch"]}
    big_train = [r["fraction_of_bound"] for r in rows if r["op"] == "train" and r["mbytes"] >= 16]
    if big_train:
        summary["train_fwd_min_fraction_of_bound_16MB_plus"] = min(big_train)
    return summary


def format_table(result: dict) -> str:
    lines = [
        f"bnc {result['config']['version']} ({result['config']['isa']}), "
        f"torch {result['torch'] or 'not installed'}, numpy {result['numpy']}",
        f"CPU: {result['cpu']}; threads: {result['threads']}",
        "",
        "| case | shape | dtype | op | bnc ms | torch ms | vs torch | numpy ms | GB/s | copy GB/s "
        "| of bound |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(v):
        return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"

    for r in result["rows"]:
        speedup = "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x"
        lines.append(
            f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['op']} "
            f"| {ms(r['bnc_ms'])} | {ms(r['torch_ms'])} | {speedup} | {ms(r['numpy_ms'])} "
            f"| {r['gbps']:.1f} | {r['copy_gbps']:.1f} | {r['fraction_of_bound']:.0%} |")
    s = result["summary"]
    lines.append("")
    if "train_fwd_bwd_geomean_vs_torch" in s:
        lines.append(f"training forward+backward vs torch, geometric mean: "
                     f"{s['train_fwd_bwd_geomean_vs_torch']:.2f}x")
        lines.append(f"inference forward vs torch, geometric mean: "
                     f"{s['eval_geomean_vs_torch']:.2f}x")
        lines.append(f"slowest case vs torch: {s['slowest_vs_torch']['case']} "
                     f"{s['slowest_vs_torch']['speedup']:.2f}x")
    if "train_fwd_min_fraction_of_bound_16MB_plus" in s:
        lines.append(f"training forward on tensors >= 16 MB, lowest fraction of the I/O bound: "
                     f"{s['train_fwd_min_fraction_of_bound_16MB_plus']:.0%}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnc bench", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=bnc.get_num_threads(),
                        help="threads for bnc and PyTorch (default: bnc.get_num_threads())")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, NumPy only on tensors up to 16 MB")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--filter", metavar="TEXT",
                        help="only cases whose name, shape (e.g. 32x256x56x56) or dtype "
                             "contains TEXT")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads: expected a positive count")
    cases = CASES
    if args.filter:
        def text(case: Case) -> str:
            name, shape, _, dtype = case
            return f"{name} {shape} {'x'.join(map(str, shape))} {dtype}"
        cases = [c for c in CASES if args.filter in text(c)]
        if not cases:
            parser.error(f"--filter: no case matches {args.filter!r} (names, shapes such as "
                         "'32x256x56x56' or '(32, 256, 56, 56)', dtypes)")
    result = run(args.threads, args.quick, cases)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
