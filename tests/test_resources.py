"""Resources: no memory or reference leak over many calls (error paths included), and only
O(C x threads) workspace (peak RSS of one forward / backward on 64 MB)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import F32

import bnc
from bnc import _core


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_memory_leak_over_100k_calls():
    rng = np.random.default_rng(70)
    x = rng.standard_normal((8, 4)).astype(F32)
    dy = rng.standard_normal((8, 4)).astype(F32)
    w, b = np.ones(4, F32), np.zeros(4, F32)
    rm, rv = np.zeros(4, F32), np.ones(4, F32)
    out, dx = np.empty_like(x), np.empty_like(x)
    sm, si, gw, gb = (np.empty(4, F32) for _ in range(4))
    bad_out = np.empty((8, 5), F32)
    refcounts = [sys.getrefcount(a) for a in (x, dy, w, b, rm, rv, out, dx, sm, si, gw, gb)]

    def step(i):
        if i % 8:
            # the bindings directly: where a leak would be
            _core.forward_train(x, out, w, b, rm, rv, 1, 1e-5, 0.1, sm, si)
            _core.backward(dy, x, dx, sm, si, w, 1, True, gw, gb)
            _core.forward_eval(x, out, w, b, rm, rv, 1, 1e-5, sm, si)
        else:
            y, m, s = bnc.batch_norm_forward(x, w, b, rm, rv, out=out)
            bnc.batch_norm_backward(dy, x, m, s, w, out=dx)
        if i % 10 == 3:  # an error path: the exception is raised from C++
            try:
                _core.forward_train(x, bad_out, w, b, rm, rv, 1, 1e-5, 0.1, sm, si)
            except ValueError:
                pass
            else:
                raise AssertionError("expected ValueError")

    for i in range(10_000):
        step(i)
    gc.collect()
    rss_10k = _rss_bytes()
    for i in range(10_000, 100_000):
        step(i)
    gc.collect()
    growth = _rss_bytes() - rss_10k
    assert growth < 2 * 2 ** 20, f"resident memory grew by {growth} bytes over 90,000 calls"
    after = [sys.getrefcount(a) for a in (x, dy, w, b, rm, rv, out, dx, sm, si, gw, gb)]
    assert after == refcounts, "reference counts of the arguments changed (leaked references)"


# The scripts' common head: imports and status(field), a /proc/self/status figure in bytes.
_SCRIPT_HEAD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import bnc

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
        raise LookupError(field)
    """
)

_PEAK_SCRIPT = _SCRIPT_HEAD + textwrap.dedent(
    """
    def rss():
        return status("VmRSS")

    def peak():
        # VmHWM: the peak RSS of this process image. (getrusage's ru_maxrss is no good here: Linux
        # carries it over fork + exec, so a child starts with the parent's -- pytest's -- peak.)
        return status("VmHWM")

    bnc.set_num_threads(int(sys.argv[1]))
    # warm up: start the OpenMP team and touch the code paths with a small multi-threaded call
    w = np.random.default_rng(0).standard_normal((8, 64, 32, 32), dtype=np.float32)
    yw, mw, sw = bnc.batch_norm_forward(w)
    bnc.batch_norm_backward(w, w, mw, sw)
    bnc.batch_norm_forward(np.moveaxis(w, 1, -1).copy(), axis=-1)
    del w, yw

    n = 16 * 2**20  # 64 MB of float32
    rng = np.random.default_rng(1)
    x = np.empty(n, np.float32)
    rng.standard_normal(out=x, dtype=np.float32)  # no temporaries: current RSS is the peak
    dy = np.empty(n, np.float32)
    rng.standard_normal(out=dy, dtype=np.float32)
    out = np.zeros(n, np.float32)
    out.fill(1.0)
    result = {"slack": peak() - rss()}
    for name, shape, axis in (("nchw", (64, 64, 64, 64), 1), ("nhwc", (64, 64, 64, 64), -1),
                              ("nc", (2**20, 16), 1), ("ncl", (8, 4, n // 32), 1)):
        xs, dys, outs = x.reshape(shape), dy.reshape(shape), out.reshape(shape)
        c = shape[axis]
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        before = peak()
        y, m, s = bnc.batch_norm_forward(xs, None, None, rm, rv, axis=axis, out=outs)
        result[name + "-forward"] = peak() - before
        before = peak()
        bnc.batch_norm_forward(xs, None, None, rm, rv, training=False, axis=axis, out=outs)
        result[name + "-eval"] = peak() - before
        before = peak()
        bnc.batch_norm_backward(dys, xs, m, s, None, axis=axis, out=outs)
        result[name + "-backward"] = peak() - before
    result["rss_final_minus_peak"] = rss() - peak()
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_peak_memory_of_forward_and_backward_with_out(tmp_path):
    """With out= preallocated, one forward / backward on 64 MB of float32 raises the peak RSS by
    less than 4 MB: the kernels allocate only O(C x threads) workspace, no copy of the tensor.
    Measured in a fresh interpreter (the peak RSS never goes down)."""
    threads = max(2, min(4, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(threads)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the measurement is only meaningful if RSS was at its peak when it started
    assert result.pop("slack") < 2 * 2 ** 20, result
    result.pop("rss_final_minus_peak")
    too_much = {k: v for k, v in result.items() if v >= 4 * 2 ** 20}
    assert not too_much, f"peak RSS increase (bytes) of 4 MB or more: {too_much} (all: {result})"


_WIDE_SCRIPT = _SCRIPT_HEAD + textwrap.dedent(
    """
    def reset_peak():
        # Linux >= 4.0: VmHWM back to the current RSS. Where that is refused, VmHWM - VmRSS
        # before a call stays an upper bound of its growth (the test can only fail safe).
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    bnc.set_num_threads(int(sys.argv[1]))
    w = np.random.default_rng(0).standard_normal((8, 64, 32, 32), dtype=np.float32)
    bnc.batch_norm_forward(w)  # warm up the OpenMP team
    del w
    keep = []  # every result stays alive: the RSS only grows during the calls
    result = {}
    for name, shape, dtype in (("2xC-f32", (2, 2**23), "float32"),
                               ("4xC-f16", (4, 2**22), "float16"),
                               ("2xCx3-f64", (2, 2**20, 3), "float64"),
                               # unfused: per-channel arrays, at most ~half the input (float16)
                               ("96xC-f16", (96, 2**18), "float16")):
        rng = np.random.default_rng(1)
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        out = np.ones_like(x)
        c = shape[1]
        p = np.float64 if dtype == "float64" else np.float32
        # filled: their pages are resident before the calls
        rm, rv, wt, bs, sm, si = (np.full(c, 0.5, p) for _ in range(6))
        m64, i64 = np.full(c, 0.25), np.full(c, 2.0)
        calls = {
            "forward": lambda: bnc.batch_norm_forward(x, wt, bs, rm, rv, out=out),
            "eval": lambda: bnc.batch_norm_forward(x, wt, bs, rm, rv, training=False, out=out),
            "backward": lambda: bnc.batch_norm_backward(dy, x, sm, si, wt, out=out),
            "stats": lambda: bnc.batch_norm_stats(x),
            "elemt": lambda: bnc.batch_norm_elemt(x, m64, i64, wt, bs, out=out),
            "backward_reduce": lambda: bnc.batch_norm_backward_reduce(dy, x, m64, i64),
            "backward_elemt": lambda: bnc.batch_norm_backward_elemt(dy, x, m64, i64, wt, m64, i64,
                                                                    2 * shape[0], out=out),
        }
        for op, call in calls.items():
            reset_peak()
            rss_before = status("VmRSS")
            got = call()
            keep.append(got)
            got = got if isinstance(got, tuple) else (got,)
            returned = sum(a.nbytes for a in got if isinstance(a, np.ndarray) and a is not out)
            result[f"{name}-{op}"] = {"input": x.nbytes, "returned": returned,
                                      "growth": status("VmHWM") - rss_before}
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_workspace_of_many_channels_and_few_rows():
    """A tensor of many channels and few rows (2 or 4 per channel): besides the arrays a call
    returns, its peak RSS grows by under half the input plus 4 MB, for every operation
    (per-channel workspace was once ~9x the input of a (2, C) float32 forward)."""
    threads = max(2, min(4, os.cpu_count() or 1))
    # glibc: every block of 64 KiB or more mapped afresh and unmapped when freed, so that no freed
    # memory still resident can hide a call's allocations.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, "-c", _WIDE_SCRIPT, str(threads)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    too_much = {
        k: v for k, v in result.items()
        if v["growth"] - v["returned"] >= v["input"] // 2 + 4 * 2 ** 20
    }
    assert not too_much, f"workspace over half the input: {too_much}"
