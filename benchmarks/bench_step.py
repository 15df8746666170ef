"""Seconds per SGD step: fastsgd side by side with every peer, against a C memory roofline.

Run by hand (never a test), ideally on a quiet machine:

    KERAS_BACKEND=torch python benchmarks/bench_step.py            # the full suite (~10-15 min)
    python benchmarks/bench_step.py --quick                        # a few minutes
    python benchmarks/bench_step.py --workloads resnet50 --configs momentum,momentum_ema \\
        --peers "C loop,fastsgd,torch fused,keras" --threads 1

Every (peer, thread count) of a (workload, config) is run in blocks, round-robin in a shuffled
order each round, in this one process: the machine's drift hits every peer alike. Times are
medians of every timed call; ratios are medians over rounds of per-round (paired) ratios.
Writes bench_step.md, bench_step.json and bench_step.png to --out (benchmarks/results).
See benchmarks/README.md for the byte model and how to read the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Optional

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import peers as P  # noqa: E402
import workloads as W  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- machine ----------------------------------------------------------------------------------


def _run(cmd: list) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return ""


def load_average() -> list:
    """1/5/15-minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    """lscpu facts, memory, library versions and fastsgd's CPU level."""
    lscpu = {}
    for line in _run(["lscpu"]).splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            lscpu[k.strip()] = v.strip()
    info = {
        "cpu_model": lscpu.get("Model name", platform.processor()),
        "cpus": lscpu.get("CPU(s)", str(os.cpu_count())),
        "threads_per_core": lscpu.get("Thread(s) per core"),
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "caches": {k: lscpu[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in lscpu},
        "avx512": "avx512f" in lscpu.get("Flags", ""),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "c_compiler": (_run([os.environ.get("CC", "cc"), "--version"]).splitlines() or ["?"])[0],
        "c_flags": P.c_compiler_line(),
    }
    try:
        with open("/proc/meminfo") as f:
            mem = dict(line.split(":", 1) for line in f)
        info["memory_gib"] = round(int(mem["MemTotal"].split()[0]) / 2**20, 1)
    except Exception:
        pass
    for mod in ("torch", "keras", "jax", "optax"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        import fastsgd

        info["fastsgd"] = fastsgd.__version__
        info["fastsgd_cpu"] = fastsgd.cpu_info()
    except Exception as e:
        info["fastsgd"] = f"unavailable: {e}"
    return info


def mem_available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- threads ----------------------------------------------------------------------------------


def set_threads(n: int) -> None:
    """Caps fastsgd's and torch's (and so Keras's) CPU threads."""
    try:
        import fastsgd

        fastsgd.set_num_threads(n)
    except Exception:
        pass
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:
        pass


# ---- measuring --------------------------------------------------------------------------------


class Variant:
    """One (peer, thread count) with every timed block it ran."""

    def __init__(self, peer: P.Peer, threads: Optional[int], thread_label: str) -> None:
        self.peer, self.threads, self.thread_label = peer, threads, thread_label
        self.blocks: list = []  # per round: list of seconds per call
        self.inner = 1
        self.estimate = math.inf

    @property
    def key(self) -> tuple:
        return (self.peer.name, self.thread_label)

    def run_block(self, warm: bool, settle_s: float = 0.0) -> list:
        if settle_s:
            # Lets the previous peer's spinning OpenMP workers (libgomp spins after a parallel
            # region) go to sleep before this block starts.
            time.sleep(settle_s)
        if self.threads is not None:
            set_threads(self.threads)
            self.peer.threads = self.threads
        step = self.peer.step
        if warm:
            step()
        out = []
        clock = time.perf_counter
        for _ in range(self.inner):
            t0 = clock()
            step()
            out.append(clock() - t0)
        return out

    def times(self) -> np.ndarray:
        return np.concatenate([np.asarray(b) for b in self.blocks]) if self.blocks else np.array([])


def paired_ratio(a: Variant, b: Variant) -> float:
    """Median over rounds of median(a's block) / median(b's block)."""
    r = [np.median(x) / np.median(y) for x, y in zip(a.blocks, b.blocks) if len(x) and len(y)]
    return float(np.median(r)) if r else float("nan")


def paired_diff(a: Variant, b: Variant) -> float:
    """Median over rounds of median(a's block) - median(b's block), seconds."""
    r = [np.median(x) - np.median(y) for x, y in zip(a.blocks, b.blocks) if len(x) and len(y)]
    return float(np.median(r)) if r else float("nan")


_last_case = [""]


def progress(msg: str) -> None:
    """A one-line status on a terminal; one line per case otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{msg}")
        sys.stderr.flush()
        return
    case = msg.split("  ")[0]
    if case and case != _last_case[0]:
        _last_case[0] = case
        print(f"{datetime.datetime.now():%H:%M:%S} {case}", file=sys.stderr, flush=True)


def measure_case(data: P.Data, config_name: str, peer_classes: list, thread_counts: list, rounds: int,
                 block_s: float, rng: np.random.Generator, label: str, settle_s: float = 0.003) -> tuple:
    """Builds every peer for one (workload, config), warms it up and times it round-robin.
    Returns (variants, skipped {peer: reason})."""
    config = P.CONFIGS[config_name]
    skipped = {}
    peers = []
    for cls in peer_classes:
        try:
            peers.append(cls(data, config))
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            skipped[cls.name] = f"setup failed: {type(e).__name__}: {e}"
    max_threads = max(thread_counts)
    variants = []
    for peer in peers:
        if peer.threaded:
            for t in thread_counts:
                variants.append(Variant(peer, t, str(t)))
        else:
            variants.append(Variant(peer, None, "1" if peer.name == "numpy" else "own"))
    # Warm-up (builds slots, compiles, faults pages in) and a per-call estimate.
    alive = []
    for v in variants:
        try:
            v.inner = 1
            v.run_block(warm=False)
            v.estimate = min(v.run_block(warm=False) + v.run_block(warm=False))
            alive.append(v)
        except Exception as e:
            skipped[f"{v.peer.name} ({v.thread_label} threads)"] = f"step failed: {type(e).__name__}: {e}"
    variants = alive
    for v in variants:
        v.inner = int(min(200, max(1, block_s / max(v.estimate, 1e-7))))
    for r in range(rounds):
        order = rng.permutation(len(variants))
        for j, idx in enumerate(order):
            v = variants[idx]
            progress(f"{label}  round {r + 1}/{rounds}  {v.peer.name} x{v.thread_label}  "
                     f"[{j + 1}/{len(variants)}]")
            v.blocks.append(v.run_block(warm=v.estimate < 5e-3, settle_s=settle_s))
    set_threads(max_threads)
    return variants, skipped


def summarise(workload: str, config_name: str, numel: int, variants: list) -> list:
    """One record per variant: times, GB/s, paired ratios to the C loop and to the best peer."""
    bytes_per = P.BYTE_MODEL[config_name][0]
    by_key = {v.key: v for v in variants}

    def c_ref(v: Variant) -> Optional[Variant]:
        t = v.thread_label if v.thread_label.isdigit() else "1"
        return by_key.get(("C loop", t)) or by_key.get(("C loop", "1"))

    def is_peer(v: Variant) -> bool:
        return not v.peer.name.startswith("fastsgd") and v.peer.name != "C loop"

    out = []
    for v in variants:
        t = v.times()
        med = float(np.median(t))
        same = [u for u in variants if is_peer(u) and (u.thread_label == v.thread_label or not u.peer.threaded)]
        best = min(same, key=lambda u: np.median(u.times()), default=None)
        ref = c_ref(v)
        out.append({
            "workload": workload, "config": config_name, "peer": v.peer.name, "threads": v.thread_label,
            "median_s": med, "p25_s": float(np.percentile(t, 25)), "p75_s": float(np.percentile(t, 75)),
            "calls": int(t.size), "gbps": bytes_per * numel / med / 1e9,
            "x_c_loop": paired_ratio(v, ref) if ref is not None else None,
            "minus_c_loop_s": paired_diff(v, ref) if ref is not None else None,
            "best_peer": f"{best.peer.name} x{best.thread_label}" if best is not None else None,
            "x_best_peer": paired_ratio(v, best) if best is not None else None,
        })
    return out


# ---- import cost --------------------------------------------------------------------------------


def measure_import_cost(rounds: int, thread_counts: list) -> dict:
    """Per-tensor cost of fastsgd's apply() for NumPy arrays and torch tensors: steps over N
    one-element tensors (plain SGD, 1 thread) for N = 1 and 2,000; the slope minus the C
    loop's slope (timed inside C) is the per-tensor import + bookkeeping cost. Also the
    whole-step overhead over ResNet-50's 161 shapes as torch and NumPy tensors (momentum),
    apply() time minus the C loop timed inside C on the same bytes."""
    import fastsgd

    result: dict = {"method": "slope between N=1 and N=2000 one-element tensors, plain config, 1 thread; "
                              "C loop timed inside C (no ctypes)"}
    set_threads(1)
    cases = {}
    for n in (1, 2000):
        data = P.Data.make([(1,)] * n, seed=3)
        cases[n] = (data, P.FastSGD(data, P.CONFIGS["plain"]), P.FastSGDTorch(data, P.CONFIGS["plain"]),
                    P.CLoop(data, P.CONFIGS["plain"]))
    samples: dict = {}
    for r in range(rounds):
        for n, (_, fnp, ftorch, c) in cases.items():
            for name, peer in (("numpy", fnp), ("torch", ftorch)):
                for _ in range(20):
                    peer.step()
                ts = []
                for _ in range(200):
                    t0 = time.perf_counter()
                    peer.step()
                    ts.append(time.perf_counter() - t0)
                samples.setdefault((name, n), []).append(float(np.median(ts)))
            samples.setdefault(("c", n), []).append(c.time_in_c(200))
        progress(f"import cost  round {r + 1}/{rounds}")
    med = {k: float(np.median(v)) for k, v in samples.items()}
    c_slope = (med[("c", 2000)] - med[("c", 1)]) / 1999
    for name in ("numpy", "torch"):
        slope = (med[(name, 2000)] - med[(name, 1)]) / 1999
        result[name] = {
            "step_1_tensor_us": med[(name, 1)] * 1e6, "step_2000_tensors_us": med[(name, 2000)] * 1e6,
            "per_tensor_ns": slope * 1e9, "kernel_per_tensor_ns": c_slope * 1e9,
            "import_per_tensor_ns": (slope - c_slope) * 1e9,
        }
    result["c_loop_1_tensor_us"] = med[("c", 1)] * 1e6
    result["c_loop_2000_tensors_us"] = med[("c", 2000)] * 1e6
    del cases
    gc.collect()

    # Whole-step overhead on ResNet-50's 161 tensors (momentum). Two views:
    #  * proxy: the same 161 tensors with one element each (same ndim, same objects per call):
    #    apply() minus the C loop timed inside C is everything but the kernel, precisely;
    #  * full size: apply() minus the C loop on the real shapes, alternating call by call (the
    #    machine's noise on a ~20 ms step is larger than the overhead itself: read the IQR).
    cfg = P.CONFIGS["momentum"]
    unit = P.Data.make([tuple(1 for _ in s) for s in W.resnet50_shapes()], seed=4)
    full = P.Data.make(W.resnet50_shapes(), seed=4)
    sets = {"unit": unit, "full": full}
    contenders = {(k, name): cls(d, cfg) for k, d in sets.items()
                  for name, cls in (("numpy", P.FastSGD), ("torch", P.FastSGDTorch))}
    cloops = {k: P.CLoop(d, cfg) for k, d in sets.items()}
    rn: dict = {}
    for t in thread_counts:
        set_threads(t)
        for c in cloops.values():
            c.threads = t
        rows: dict = {key: [] for key in contenders}
        for p in contenders.values():
            p.step()
        for r in range(rounds):
            for (k, name), p in contenders.items():
                # apply() and the C loop alternate call by call, so each difference is paired
                reps = 50 if k == "unit" else 4
                for _ in range(reps):
                    t0 = time.perf_counter()
                    p.step()
                    a = time.perf_counter() - t0
                    rows[(k, name)].append((a, cloops[k].time_in_c(1)))
            progress(f"resnet50 overhead  x{t}  round {r + 1}/{rounds}")
        out: dict = {}
        for (k, name), d in rows.items():
            diffs = [a - b for a, b in d]
            out.setdefault(name, {})[k] = {
                "apply_us": float(np.median([a for a, _ in d])) * 1e6,
                "c_loop_us": float(np.median([b for _, b in d])) * 1e6,
                "overhead_us": float(np.median(diffs)) * 1e6,
                "overhead_iqr_us": [float(np.percentile(diffs, 25)) * 1e6, float(np.percentile(diffs, 75)) * 1e6]}
        rn[str(t)] = out
    result["resnet50_momentum"] = rn
    set_threads(max(thread_counts))
    return result


# ---- targets ------------------------------------------------------------------------------------


def evaluate_targets(records: list, thread_counts: list) -> list:
    """The project's performance targets, each with its measured value (same run).

    Ratios to the C loop are paired and per thread count. Speed-ups over a peer compare each
    side at its best thread count (torch's 2-thread rows can suffer from libgomp stacking on
    a 2-vCPU VM, see README), except where the target names a thread count."""
    idx = {(r["workload"], r["config"], r["peer"], r["threads"]): r for r in records}
    all_t = str(max(thread_counts))
    out = []

    def add(target: str, measured: Optional[float], ok: Optional[bool], detail: str) -> None:
        out.append({"target": target, "measured": measured, "met": ok, "detail": detail})

    def rec(w, c, p, t):
        return idx.get((w, c, p, t))

    def best(w, c, p):
        rs = [r for r in records if r["workload"] == w and r["config"] == c and r["peer"] == p]
        return min(rs, key=lambda r: r["median_s"]) if rs else None

    def speedup(w, c, peer):
        a, b = best(w, c, "fastsgd"), best(w, c, peer)
        if not a or not b:
            return None, ""
        return b["median_s"] / a["median_s"], f"{peer} x{b['threads']} {fmt_time(b['median_s'])} / " \
                                               f"fastsgd x{a['threads']} {fmt_time(a['median_s'])}"

    for wl in ("big64M", "bert_base"):
        for t in thread_counts:
            t = str(t)
            for cfg in P.CONFIGS:
                r = rec(wl, cfg, "fastsgd", t)
                if r and r["x_c_loop"] is not None:
                    tf = rec(wl, cfg, "torch fused", t)
                    note = f"torch fused ÷ C = {tf['x_c_loop']:.2f}" if tf and tf["x_c_loop"] else ""
                    add(f"{wl} {cfg} x{t}: fastsgd ≤ 1.05× C loop", r["x_c_loop"], r["x_c_loop"] <= 1.05, note)
        for cfg in P.CONFIGS:
            sp, note = speedup(wl, cfg, "torch fused")
            if sp is not None:
                goal = 1.15 if cfg == "momentum_ema" else 0.95
                add(f"{wl} {cfg}: torch fused{' + lerp' if cfg == 'momentum_ema' else ''} ÷ fastsgd "
                    f"{'≈ 1.2' if cfg == 'momentum_ema' else '≥ parity'}", sp, sp >= goal, note)
    for cfg in P.CONFIGS:
        for t in thread_counts:
            t = str(t)
            r = rec("small2000", cfg, "fastsgd", t)
            if r and r["x_c_loop"] is not None:
                add(f"small2000 {cfg} x{t}: fastsgd ≤ 1.5× C loop", r["x_c_loop"], r["x_c_loop"] <= 1.5, "")
        r, tf = rec("small2000", cfg, "fastsgd", "1"), rec("small2000", cfg, "torch fused", "1")
        if r and tf:
            sp = tf["median_s"] / r["median_s"]
            add(f"small2000 {cfg} x1: torch fused ÷ fastsgd ≥ 3", sp, sp >= 3.0,
                f"{fmt_time(tf['median_s'])} / {fmt_time(r['median_s'])}")
        r1, r2 = rec("small2000", cfg, "fastsgd", "1"), rec("small2000", cfg, "fastsgd", all_t)
        if r1 and r2 and all_t != "1":
            q = r2["median_s"] / r1["median_s"]
            add(f"small2000 {cfg}: fastsgd x{all_t} ÷ x1 ≤ 1", q, q <= 1.0,
                f"{fmt_time(r2['median_s'])} / {fmt_time(r1['median_s'])}")
    for cfg in P.CONFIGS:
        for t in thread_counts:
            t = str(t)
            r = rec("cache64K", cfg, "fastsgd", t)
            if r and r["minus_c_loop_s"] is not None:
                d = r["minus_c_loop_s"] * 1e6
                c = rec("cache64K", cfg, "C loop", t)
                add(f"cache64K {cfg} x{t}: fastsgd − C loop ≤ 5 µs", d, d <= 5.0,
                    f"fastsgd {fmt_time(r['median_s'])}, C loop {fmt_time(c['median_s']) if c else '?'} "
                    "(whole Python call; C via ctypes)")
    for w, cfg, goal in (("resnet50", "momentum", 1.6), ("resnet50", "momentum_ema", 4.0),
                         ("small2000", "momentum", 10.0)):
        sp, note = speedup(w, cfg, "keras")
        if sp is not None:
            add(f"{w} {cfg}: keras ÷ fastsgd ≥ {goal}", sp, sp >= goal, note)
    # Inside Keras (issue 11): keras.optimizers.SGD vs fastsgd.keras.SGD on the same Keras variables.
    for w, cfg, goal in (("resnet50", "momentum", 2.0), ("resnet50", "momentum_ema", 5.0),
                         ("small2000", "momentum", 10.0)):
        a, b = best(w, cfg, "fastsgd.keras"), best(w, cfg, "keras")
        if a and b:
            sp = b["median_s"] / a["median_s"]
            add(f"{w} {cfg}: keras ÷ fastsgd.keras ≥ {goal}", sp, sp >= goal,
                f"keras x{b['threads']} {fmt_time(b['median_s'])} / fastsgd.keras x{a['threads']} "
                f"{fmt_time(a['median_s'])}")
    return out


# ---- report -------------------------------------------------------------------------------------


def fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def write_markdown(path: str, doc: dict) -> None:
    """The human-readable report."""
    m = doc["machine"]
    lines = ["# fastsgd step benchmark", "",
             f"Run {doc['started']} → {doc['finished']} ({doc['elapsed_min']:.1f} min), "
             f"load average before {doc['load_before']} / after {doc['load_after']}.", "",
             "## Machine", "",
             f"- CPU: {m['cpu_model']}, {m['cpus']} CPUs ({m.get('threads_per_core')} thread/core), "
             f"hypervisor {m.get('hypervisor')}, AVX-512: {m['avx512']}",
             f"- caches: {', '.join(f'{k} {v}' for k, v in m['caches'].items())}; memory {m.get('memory_gib')} GiB",
             f"- Python {m['python']}, NumPy {m['numpy']}, torch {m['torch']}, Keras {m['keras']}, "
             f"jax {m['jax']}, optax {m['optax']}",
             f"- fastsgd {m.get('fastsgd')}, CPU level {m.get('fastsgd_cpu', {}).get('active')}",
             f"- C loop: `{m['c_flags']}` ({m['c_compiler']}), pthreads, one thread per "
             f"{P.C_MIN_ELEMENTS_PER_THREAD} elements (fastsgd's rule)",
             "",
             f"STREAM triad (a = b + s·c, 12 B/element, {doc['triad']['numel'] // 2**20}M floats, best of 7): "
             + ", ".join(f"{k} thread(s) {v:.1f} GB/s" for k, v in doc["triad"]["gbps"].items()), "",
             "## Byte model (fp32, bytes per element per step)", "", "| config | B/elem | counts |", "|---|---|---|"]
    for c, (b, what) in P.BYTE_MODEL.items():
        if c in doc["settings"]["configs"]:
            lines.append(f"| {c} | {b} | {what} |")
    lines += ["", "torch.optim.SGD applies weight_decay as L2 on g (torch's rule, same bytes as Keras's "
              "decoupled decay); its EMA is an extra `torch._foreach_lerp_` pass and its global "
              "clipping `clip_grad_norm_`. Keras runs on the torch backend.", ""]
    lines += ["## Seconds per step (median)", "",
              "Columns are peers at the row's thread count (numpy is single-threaded, shown in every row). "
              "`÷C` = fastsgd / C loop at the same threads (paired, per round); "
              "`best÷` = best non-fastsgd peer / fastsgd (>1: fastsgd faster); GB/s from the byte model.", ""]
    recs = doc["results"]
    names = [p for p in ["C loop", "fastsgd", "fastsgd[torch]", "torch for-loop", "torch foreach", "torch fused",
                         "keras", "fastsgd.keras", "numpy", "optax"] if any(r["peer"] == p for r in recs)]
    for wl in doc["settings"]["workloads"]:
        wrec = [r for r in recs if r["workload"] == wl]
        if not wrec:
            continue
        desc, shapes = W.WORKLOADS[wl]
        lines += [f"### {wl} — {desc} ({W.numel(shapes):,} elements)", ""]
        skipped = doc["skipped"].get(wl, {})
        if skipped:
            lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in sorted(skipped.items())), ""]
        lines.append("| config | thr | " + " | ".join(names) + " | fastsgd GB/s | ÷C | best÷ |")
        lines.append("|---|---|" + "---|" * len(names) + "---|---|---|")
        for cfg in doc["settings"]["configs"]:
            for t in doc["settings"]["threads"]:
                t = str(t)
                row = []
                for p in names:
                    r = next((x for x in wrec if x["config"] == cfg and x["peer"] == p
                              and (x["threads"] == t or x["threads"] in ("own",) or (p == "numpy"))), None)
                    row.append(fmt_time(r["median_s"]) if r else "—")
                f = next((x for x in wrec if x["config"] == cfg and x["peer"] == "fastsgd" and x["threads"] == t), None)
                gb = f"{f['gbps']:.1f}" if f else "—"
                xc = f"{f['x_c_loop']:.2f}" if f and f["x_c_loop"] is not None else "—"
                xb = f"{1 / f['x_best_peer']:.2f} ({f['best_peer']})" if f and f["x_best_peer"] else "—"
                lines.append(f"| {cfg} | {t} | " + " | ".join(row) + f" | {gb} | {xc} | {xb} |")
        lines.append("")
    if doc.get("per_tensor"):
        lines += ["## Per-tensor overhead (small2000 − flat2000) / 2,000", "",
                  "| config | peer | threads | µs per tensor |", "|---|---|---|---|"]
        for r in doc["per_tensor"]:
            lines.append(f"| {r['config']} | {r['peer']} | {r['threads']} | {r['per_tensor_us']:.3f} |")
        lines.append("")
    ic = doc.get("import_cost")
    if ic:
        lines += ["## fastsgd import cost", "", ic["method"] + ".", "",
                  "| tensors | step, 1 tensor | step, 2,000 tensors | per tensor | kernel per tensor (C) | "
                  "import + bookkeeping per tensor |", "|---|---|---|---|---|---|"]
        for name in ("numpy", "torch"):
            r = ic[name]
            lines.append(f"| {name} | {r['step_1_tensor_us']:.2f} µs | {r['step_2000_tensors_us']:.1f} µs | "
                         f"{r['per_tensor_ns']:.0f} ns | {r['kernel_per_tensor_ns']:.0f} ns | "
                         f"{r['import_per_tensor_ns']:.0f} ns |")
        lines += ["", f"C loop (timed in C): 1 tensor {ic['c_loop_1_tensor_us']:.2f} µs, 2,000 tensors "
                  f"{ic['c_loop_2000_tensors_us']:.1f} µs.", "",
                  "ResNet-50 (161 tensors, momentum): apply() minus the C loop timed inside C. `unit` = the "
                  "161 tensors with one element each (same ndim: everything but the kernel, precise); `full` = "
                  "the real shapes, apply() and the C loop alternating call by call (noisy: the IQR is "
                  "shown).", "",
                  "| threads | tensors | shapes | apply | C loop | overhead (IQR) |", "|---|---|---|---|---|---|"]
        for t, d in ic["resnet50_momentum"].items():
            for name, per in d.items():
                for k, r in per.items():
                    lo, hi = r["overhead_iqr_us"]
                    lines.append(f"| {t} | {name} | {k} | {fmt_time(r['apply_us'] * 1e-6)} | "
                                 f"{fmt_time(r['c_loop_us'] * 1e-6)} | {r['overhead_us']:.1f} µs "
                                 f"({lo:.1f} … {hi:.1f}) |")
        lines.append("")
    if doc.get("targets"):
        lines += ["## Targets (this run)", "", "| target | measured | met | note |", "|---|---|---|---|"]
        for t in doc["targets"]:
            v = t["measured"]
            lines.append(f"| {t['target']} | {v:.2f} | {'met' if t['met'] else '**not met**'} | {t['detail']} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, doc: dict) -> bool:
    """Ratio to the C loop per workload and peer (one panel per config): each peer's best thread
    count over the C loop's best."""
    from fastsgd._bench import plot_ratio_panels

    recs = doc["results"]
    configs = [c for c in doc["settings"]["configs"] if any(r["config"] == c for r in recs)]
    wls = [w for w in doc["settings"]["workloads"] if any(r["workload"] == w for r in recs)]
    names = [p for p in ["fastsgd", "fastsgd[torch]", "torch for-loop", "torch foreach", "torch fused", "keras",
                         "numpy", "optax"] if any(r["peer"] == p for r in recs)]

    def ratio(cfg: str, w: str, p: str) -> float:
        case = [x for x in recs if x["workload"] == w and x["config"] == cfg]
        mine = [x["median_s"] for x in case if x["peer"] == p]
        ref = [x["median_s"] for x in case if x["peer"] == "C loop"]
        return min(mine) / min(ref) if mine and ref else float("nan")

    return plot_ratio_panels(path, configs, wls, names, ratio, "C loop",
                             "Seconds per step ÷ the one-pass C loop (each at its best thread count; lower is better)")


def parse_list(value: Optional[str], known: list, what: str) -> list:
    if not value:
        return list(known)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; known: {known}")
    return items


def main(argv=None) -> int:
    """Runs the suite and writes the Markdown, JSON and PNG reports."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds, short blocks, no BERT-base, no 64M tensor (a few minutes)")
    ap.add_argument("--workloads", help=f"comma list of {list(W.WORKLOADS)}")
    ap.add_argument("--configs", help=f"comma list of {list(P.CONFIGS)}")
    ap.add_argument("--peers", help=f"comma list of {[p.name for p in P.PEERS]}")
    ap.add_argument("--skip", action="append", default=[], metavar="WORKLOAD:PEER[,PEER]",
                    help="leave peers out of one workload (repeatable), e.g. bert_base:numpy,keras")
    ap.add_argument("--threads", help="comma list of thread counts (default: 1 and all CPUs)")
    ap.add_argument("--rounds", type=int, help="round-robin rounds per case (default 9, quick 3)")
    ap.add_argument("--block-ms", type=float, help="target milliseconds per timed block (default 40, quick 15)")
    ap.add_argument("--settle-ms", type=float, default=3.0,
                    help="sleep before each block, so the previous peer's spinning threads go idle (default 3)")
    ap.add_argument("--no-import-cost", action="store_true", help="skip the fastsgd import-cost measurement")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    ap.add_argument("--name", default="bench_step", help="output file stem")
    args = ap.parse_args(argv)

    default_wls = [w for w in W.WORKLOADS if not (args.quick and w in ("bert_base", "big64M"))]
    workloads = parse_list(args.workloads, list(W.WORKLOADS), "workloads") if args.workloads else default_wls
    configs = parse_list(args.configs, list(P.CONFIGS), "configs")
    peer_names = parse_list(args.peers, [p.name for p in P.PEERS], "peers")
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, ncpu})
    rounds = args.rounds or (3 if args.quick else 9)
    block_s = (args.block_ms or (15 if args.quick else 40)) / 1e3
    skip: dict = {}
    for s in args.skip:
        wl, _, names = s.partition(":")
        skip.setdefault(wl, set()).update(n.strip() for n in names.split(","))

    classes, unavailable = [], {}
    for name in peer_names:
        cls = P.PEER_BY_NAME[name]
        why = cls.available()
        if why:
            unavailable[name] = why
        else:
            classes.append(cls)
    for name, why in unavailable.items():
        print(f"skipping peer {name!r}: {why}", file=sys.stderr)

    started = datetime.datetime.now()
    doc = {"started": started.isoformat(timespec="seconds"), "load_before": load_average(),
           "machine": machine_info(),
           "settings": {"workloads": workloads, "configs": configs, "peers": [c.name for c in classes],
                        "threads": threads, "rounds": rounds, "block_ms": block_s * 1e3, "quick": args.quick,
                        "settle_ms": args.settle_ms,
                        "lr": P.LR, "momentum": P.MOMENTUM, "weight_decay": P.WEIGHT_DECAY,
                        "ema_momentum": P.EMA_MOMENTUM, "global_clipnorm": P.GLOBAL_CLIPNORM},
           "unavailable": unavailable, "skipped": {}, "results": []}
    print(f"machine: {doc['machine']['cpu_model']}, {doc['machine']['cpus']} CPUs; load {doc['load_before']}",
          file=sys.stderr)
    if P.CLoop in classes:
        n = 16 * 2**20 if args.quick else 64 * 2**20
        doc["triad"] = {"numel": n, "gbps": {str(t): P.triad_gbps(n, t) for t in threads}}
        print(f"STREAM triad: {doc['triad']['gbps']} GB/s", file=sys.stderr)
    else:
        doc["triad"] = {"numel": 0, "gbps": {}}

    rng = np.random.default_rng(12345)
    variants_by_case: dict = {}
    t_start = time.perf_counter()
    for wl in workloads:
        desc, shapes = W.WORKLOADS[wl]
        numel = W.numel(shapes)
        wl_classes = [c for c in classes if c.name not in skip.get(wl, set())]
        for c in classes:
            if c.name in skip.get(wl, set()):
                doc["skipped"].setdefault(wl, {})[c.name] = "--skip"
        # Memory: shared w and g, plus each peer's slots and extra buffers for the worst config.
        avail = mem_available_bytes()
        worst = max(P.slots_of(P.CONFIGS[c]) for c in configs)
        need = lambda cs: 4 * numel * (2 + sum(worst + c.extra_buffers for c in cs))  # noqa: E731
        for drop in ("keras", "numpy", "torch for-loop", "torch foreach", "optax", "fastsgd[torch]"):
            if avail is None or need(wl_classes) <= 0.8 * avail:
                break
            if any(c.name == drop for c in wl_classes):
                wl_classes = [c for c in wl_classes if c.name != drop]
                doc["skipped"].setdefault(wl, {})[drop] = "not enough memory"
                print(f"{wl}: skipping {drop} (memory)", file=sys.stderr)
        progress(f"{wl}: allocating {numel:,} elements")
        data = P.Data.make(shapes, seed=0, with_torch=any(c.name.startswith(("torch", "keras", "fastsgd[torch]"))
                                                          for c in wl_classes))
        for cfg in configs:
            variants, skipped = measure_case(data, cfg, wl_classes, threads, rounds, block_s, rng, f"{wl} {cfg}",
                                             settle_s=args.settle_ms / 1e3)
            for k, v in skipped.items():
                doc["skipped"].setdefault(wl, {})[k] = v
            doc["results"] += summarise(wl, cfg, numel, variants)
            variants_by_case[(wl, cfg)] = {v.key: v for v in variants}
            for v in variants:  # keep the timings, drop the state
                v.peer = type("Done", (), {"name": v.peer.name, "threaded": v.peer.threaded})()
            del variants
            gc.collect()
        del data
        gc.collect()
    progress("")

    # Per-tensor overhead: small2000 minus flat2000 (the same elements as one tensor).
    doc["per_tensor"] = []
    for cfg in configs:
        a, b = variants_by_case.get(("small2000", cfg)), variants_by_case.get(("flat2000", cfg))
        if not a or not b:
            continue
        for key, v in a.items():
            if key in b:
                d = float(np.median(v.times()) - np.median(b[key].times()))
                doc["per_tensor"].append({"config": cfg, "peer": key[0], "threads": key[1],
                                          "per_tensor_us": d / 2000 * 1e6})
    if not args.no_import_cost and P.FastSGD in classes and P.FastSGDTorch in classes and P.CLoop in classes:
        doc["import_cost"] = measure_import_cost(rounds=max(3, rounds), thread_counts=threads)
        progress("")
    doc["targets"] = evaluate_targets(doc["results"], threads)
    doc["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    doc["elapsed_min"] = (time.perf_counter() - t_start) / 60
    doc["load_after"] = load_average()

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    write_markdown(stem + ".md", doc)
    plotted = write_plot(stem + ".png", doc)
    print(f"wrote {stem}.md, {stem}.json" + (f", {stem}.png" if plotted else ""), file=sys.stderr)
    for t in doc["targets"]:
        print(f"{'ok ' if t['met'] else 'NO '} {t['target']}: {t['measured']:.2f} {t['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
