"""Bytes per element and step time of each low-precision mode, beside a C loop moving the same bytes.

One plain SGD step (no momentum) over one large 16-bit variable (float32 for the float32 row).
The C loop (lowp_bytes.c, OpenMP) reads and writes exactly the buffers the engine does for that
mode, with one integer add per element. Both sides run at 1 thread and at 2 (this machine's
vCPUs); the table gives the 1-thread ratio and the ratio of each side's best. Writes
benchmarks/results/lowp_bench.md.

    python benchmarks/lowp_bench.py [--n 67108864] [--reps 7] [--threads 1 2]
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
F16 = np.dtype(np.float16)

# name, variable dtype, optimizer kwargs, C loop mode, bytes per element moved
MODES = [
    ("float32", np.float32, {}, 0, 12),
    ("bfloat16, to nearest", BF16, {}, 1, 6),
    ("bfloat16, stochastic", BF16, {"stochastic_rounding": True}, 1, 6),
    ("bfloat16 + float32 master", BF16, {"master_weights": "float32"}, 2, 12),
    ("bfloat16 + master, stochastic", BF16, {"master_weights": "float32", "stochastic_rounding": True}, 2, 12),
    ("bfloat16 + remainder", BF16, {"master_weights": "remainder"}, 3, 10),
    ("bfloat16 + remainder, stochastic", BF16, {"master_weights": "remainder", "stochastic_rounding": True}, 3, 10),
    ("float16, to nearest", F16, {}, 1, 6),
    ("float16, stochastic", F16, {"stochastic_rounding": True}, 1, 6),
    ("float16 + float32 master", F16, {"master_weights": "float32"}, 2, 12),
    ("float16 + master, stochastic", F16, {"master_weights": "float32", "stochastic_rounding": True}, 2, 12),
]


def build_c():
    out = os.path.join(tempfile.mkdtemp(), "lowp_bytes.so")
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-o", out,
                    os.path.join(HERE, "lowp_bytes.c")], check=True)
    lib = ctypes.CDLL(out)
    lib.lb_run.restype = ctypes.c_double
    lib.lb_run.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p]
    return lib


def engine_time(dtype, kwargs, n, reps, threads):
    fastsgd.set_num_threads(threads)
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


def c_time(lib, mode, n, reps, threads):
    w = np.zeros(n, np.uint32 if mode == 0 else np.uint16)
    g = np.ones(n, w.dtype)
    x = np.zeros(n, np.uint32 if mode == 2 else np.uint16)
    return lib.lb_run(mode, n, reps, threads, w.ctypes.data, g.ctypes.data, x.ctypes.data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 26)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "lowp_bench.md"))
    a = ap.parse_args()
    lib = build_c()
    load = os.getloadavg()
    rows = []
    c_cache: dict = {}
    for name, dtype, kwargs, mode, nbytes in MODES:
        te = {t: engine_time(dtype, kwargs, a.n, a.reps, t) for t in a.threads}
        # One C loop per byte pattern, shared by the rows that move those bytes, and timed more
        # often: on a shared VM its best-of is what is stable.
        if mode not in c_cache:
            c_cache[mode] = {t: c_time(lib, mode, a.n, 3 * a.reps, t) for t in a.threads}
        tc = c_cache[mode]
        rows.append((name, nbytes, te, tc))
        t1 = a.threads[0]
        print(f"{name:34s} {nbytes:3d} B/elt  engine " + " ".join(f"{te[t] * 1e3:7.2f}" for t in a.threads)
              + " ms  C loop " + " ".join(f"{tc[t] * 1e3:7.2f}" for t in a.threads)
              + f" ms  ratio {t1} thread {te[t1] / tc[t1]:5.2f}  best/best {min(te.values()) / min(tc.values()):5.2f}",
              flush=True)
    info = fastsgd.cpu_info()
    threads = " and ".join(str(t) for t in a.threads)
    with open(a.out, "w") as f:
        f.write(f"# Low-precision modes: one plain SGD step, {a.n} elements\n\n")
        f.write(f"CPU ISA level {info['active']}; each figure the best of {a.reps} steps, at {threads} threads "
                f"on both sides; load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                "(2 vCPUs shared with other work: ratios are what to read, absolute times move with the "
                "load). `best / best` divides each side's fastest thread count.\n\n")
        head = "".join(f" engine ms, {t}T |" for t in a.threads) + "".join(f" C ms, {t}T |" for t in a.threads)
        f.write(f"| mode | bytes/element |{head} engine / C, {a.threads[0]}T | engine / C, best / best |\n")
        f.write("|---|---:|" + "---:|" * (2 * len(a.threads) + 2) + "\n")
        for name, nbytes, te, tc in rows:
            cells = "".join(f" {te[t] * 1e3:.2f} |" for t in a.threads) + "".join(f" {tc[t] * 1e3:.2f} |" for t in a.threads)
            t1 = a.threads[0]
            f.write(f"| {name} | {nbytes} |{cells} {te[t1] / tc[t1]:.2f} | {min(te.values()) / min(tc.values()):.2f} |\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
