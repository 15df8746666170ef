"""Bytes per element and step time of each low-precision mode, beside a C loop moving the same bytes.

One plain SGD step (no momentum) over one large bfloat16 variable (float32 for the float32
row), single-threaded on both sides; the C loop (lowp_bytes.c) reads and writes exactly the
buffers the engine does for that mode, with one integer add per element. Writes
benchmarks/results/lowp_bench.md.

    python benchmarks/lowp_bench.py [--n 33554432] [--reps 7]
"""
import argparse
import ctypes
import os
import subprocess
import tempfile
import time

import ml_dtypes
import numpy as np

import fastsgd

HERE = os.path.dirname(os.path.abspath(__file__))
BF16 = np.dtype(ml_dtypes.bfloat16)

# name, variable dtype, optimizer kwargs, C loop mode, bytes per element moved
MODES = [
    ("float32", np.float32, {}, 0, 12),
    ("bfloat16, to nearest", BF16, {}, 1, 6),
    ("bfloat16, stochastic", BF16, {"stochastic_rounding": True}, 1, 6),
    ("bfloat16 + float32 master", BF16, {"master_weights": "float32"}, 2, 12),
    ("bfloat16 + master, stochastic", BF16, {"master_weights": "float32", "stochastic_rounding": True}, 2, 12),
    ("bfloat16 + remainder", BF16, {"master_weights": "remainder"}, 3, 10),
    ("bfloat16 + remainder, stochastic", BF16, {"master_weights": "remainder", "stochastic_rounding": True}, 3, 10),
]


def build_c():
    out = os.path.join(tempfile.mkdtemp(), "lowp_bytes.so")
    subprocess.run(["cc", "-O3", "-march=native", "-fPIC", "-shared", "-o", out,
                    os.path.join(HERE, "lowp_bytes.c")], check=True)
    lib = ctypes.CDLL(out)
    lib.lb_run.restype = ctypes.c_double
    lib.lb_run.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p]
    return lib


def engine_time(dtype, kwargs, n, reps):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(np.float32).astype(dtype)
    g = (rng.standard_normal(n).astype(np.float32) * 1e-3).astype(dtype)
    opt = fastsgd.SGD(learning_rate=1e-3, **kwargs)
    opt.apply([g], [w])
    best = 1e30
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.apply([g], [w])
        best = min(best, time.perf_counter() - t0)
    return best


def c_time(lib, mode, n, reps):
    w = np.zeros(n, np.uint32 if mode == 0 else np.uint16)
    g = np.ones(n, w.dtype)
    x = np.zeros(n, np.uint32 if mode == 2 else np.uint16)
    return lib.lb_run(mode, n, reps, w.ctypes.data, g.ctypes.data, x.ctypes.data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 25)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "lowp_bench.md"))
    a = ap.parse_args()
    fastsgd.set_num_threads(1)
    lib = build_c()
    load = os.getloadavg()
    rows = []
    for name, dtype, kwargs, mode, nbytes in MODES:
        te = engine_time(dtype, kwargs, a.n, a.reps)
        tc = c_time(lib, mode, a.n, a.reps)
        rows.append((name, nbytes, te, tc))
        print(f"{name:34s} {nbytes:3d} B/elt  engine {te * 1e3:8.2f} ms ({nbytes * a.n / te / 1e9:5.1f} GB/s)"
              f"  C loop {tc * 1e3:8.2f} ms  ratio {te / tc:5.2f}", flush=True)
    info = fastsgd.cpu_info()
    with open(a.out, "w") as f:
        f.write(f"# Low-precision modes: one plain SGD step, {a.n} elements, 1 thread\n\n")
        f.write(f"CPU ISA level {info['active']}; best of {a.reps}; load average before the run "
                f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 vCPUs shared with other work: "
                "ratios are what to read, absolute times move with the load).\n\n")
        f.write("| mode | bytes/element | engine ms | engine GB/s | C loop (same bytes) ms | engine / C |\n")
        f.write("|---|---:|---:|---:|---:|---:|\n")
        for name, nbytes, te, tc in rows:
            f.write(f"| {name} | {nbytes} | {te * 1e3:.2f} | {nbytes * a.n / te / 1e9:.1f} | {tc * 1e3:.2f} | "
                    f"{te / tc:.2f} |\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
