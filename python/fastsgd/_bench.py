"""``python -m fastsgd bench``: a quick speed check of fastsgd on this machine.

Times one SGD step (momentum 0.9) of fastsgd against the same rule written as naive
per-tensor NumPy, and against ``torch.optim.SGD(fused=True)`` when torch is importable, on
a few workloads. Peers run round-robin in this one process and the medians are reported,
so machine drift hits everyone alike. With matplotlib installed it draws the benchmark suite's
plot (one panel per config, one bar per peer and workload, time over a reference on a log
scale); the suite divides by a one-pass C loop it compiles, which an installed package cannot,
so here the reference is the naive NumPy step. The full suite, with more peers, the C roofline
and a byte model, is ``benchmarks/bench_step.py`` in the source tree.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import numpy as np

from ._progress import Progress

LR, MOMENTUM = 0.01, 0.9
PEERS = ("fastsgd", "torch fused", "numpy")
REFERENCE = "numpy"


def workloads(quick: bool = True) -> dict:
    """name -> list of 1-D tensor sizes (float32 elements)."""
    rng = np.random.default_rng(0)
    out = {
        "one 64K tensor": [65536],
        "2,000 small tensors": [int(n) for n in rng.integers(1, 4097, 2000)],
        "one 16M tensor": [16 * 2**20],
    }
    if not quick:
        out["one 64M tensor"] = [64 * 2**20]
    return out


def configs(quick: bool = True) -> dict:
    """name -> SGD keyword arguments (learning_rate is added)."""
    out = {"momentum": dict(momentum=MOMENTUM)}
    if not quick:
        out["nesterov"] = dict(momentum=MOMENTUM, nesterov=True)
        out["momentum + EMA"] = dict(momentum=MOMENTUM, use_ema=True, ema_momentum=0.99)
        out["momentum + global_clipnorm"] = dict(momentum=MOMENTUM, global_clipnorm=1.0)
    return out


def _numpy_step(config: dict, w: list, g: list) -> Callable[[], None]:
    """The same update as naive per-tensor NumPy (Keras's rule, temporaries as written)."""
    mom = np.float32(config.get("momentum", 0.0))
    lr = np.float32(LR)
    m = [np.zeros_like(a) for a in w]
    avg = [a.copy() for a in w] if config.get("use_ema") else None
    keep = np.float32(config.get("ema_momentum", 0.99))
    clip = config.get("global_clipnorm")
    nesterov = bool(config.get("nesterov"))

    def step() -> None:
        grads = g
        if clip:
            norm = float(np.sqrt(sum(float(np.vdot(x, x)) for x in g)))
            grads = [x * np.float32(clip / max(norm, clip)) for x in g]
        for i, (wi, gi) in enumerate(zip(w, grads)):
            mi = m[i]
            mi *= mom
            mi -= lr * gi
            if nesterov:
                wi += mom * mi - lr * gi
            else:
                wi += mi
            if avg is not None:
                avg[i] *= keep
                avg[i] += (np.float32(1) - keep) * wi

    return step


def _torch_step(config: dict, w: list, g: list) -> Optional[Callable[[], None]]:
    """torch.optim.SGD(fused=True) over torch views of the same memory (None without torch)."""
    try:
        import torch
    except Exception:
        return None
    params = []
    for wi, gi in zip(w, g):
        p = torch.nn.Parameter(torch.from_numpy(wi))
        p.grad = torch.from_numpy(gi)
        params.append(p)
    opt = torch.optim.SGD(params, lr=LR, momentum=config.get("momentum", 0.0),
                          nesterov=bool(config.get("nesterov")), fused=True)
    detached = [p.detach() for p in params]
    avg = [p.clone() for p in detached] if config.get("use_ema") else None
    weight = 1.0 - config.get("ema_momentum", 0.99)
    clip = config.get("global_clipnorm")

    def step() -> None:
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if avg is not None:
            with torch.no_grad():
                torch._foreach_lerp_(avg, detached, weight)

    return step


def _torch_threads() -> int:
    try:
        import torch

        return int(torch.get_num_threads())
    except Exception:
        return 1


def _with_torch_threads(step: Callable[[], None], threads: int) -> Callable[[], None]:
    import torch

    def run() -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        step()

    return run


def _restore_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _fastsgd_step(config: dict, w: list, g: list) -> Callable[[], None]:
    import fastsgd

    opt = fastsgd.SGD(learning_rate=LR, **config)
    return lambda: opt.apply(g, w)


def _time_block(step: Callable[[], None], calls: int) -> float:
    """Median seconds of ``calls`` timed calls (after one untimed call)."""
    step()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _fmt(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def run(quick: bool = True, rounds: Optional[int] = None, budget_s: Optional[float] = None) -> list:
    """Measures every (workload, config) and returns rows of median seconds per step:
    ``{"workload", "config", "elements", "fastsgd", "numpy", "torch fused"}`` (None when a
    peer is unavailable; torch's entry is the faster of its default thread count and one
    thread). ``rounds`` round-robin rounds per case (7 quick, 5 full); each
    block aims at ``budget_s`` seconds (0.04 quick, 0.08 full)."""
    rounds = rounds or (7 if quick else 5)
    budget_s = budget_s or (0.04 if quick else 0.08)
    default_threads = _torch_threads()
    cases = [(wn, sizes, cn, cfg) for wn, sizes in workloads(quick).items() for cn, cfg in configs(quick).items()]
    rows = []
    progress = Progress(len(cases) * rounds)
    done = 0
    for wname, sizes, cname, cfg in cases:
        rng = np.random.default_rng(1)
        w = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
        g = [rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2) for n in sizes]
        peers = {"fastsgd": _fastsgd_step(cfg, w, g), "numpy": _numpy_step(cfg, w, g)}
        torch_step = _torch_step(cfg, w, g)
        if torch_step is not None:
            # torch at its default thread count and at one thread (its best is reported): on
            # small VMs libgomp's spinning workers can share the caller's core and stall.
            peers["torch fused"] = _with_torch_threads(torch_step, default_threads)
            if default_threads > 1:
                peers["torch fused x1"] = _with_torch_threads(torch_step, 1)
        calls = {}
        for name, step in peers.items():  # warm up and size the blocks
            step()
            t0 = time.perf_counter()
            step()
            calls[name] = int(min(100, max(1, budget_s / max(time.perf_counter() - t0, 1e-7))))
        medians: dict = {name: [] for name in peers}
        for r in range(rounds):
            names = list(peers)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                medians[name].append(_time_block(peers[name], calls[name]))
            if default_threads > 1:
                _restore_torch_threads(default_threads)
            done += 1
            progress.update(done, f"{wname}, {cname}", milestone=r == rounds - 1)
        row = {"workload": wname, "config": cname, "elements": int(sum(sizes))}
        for name in ("fastsgd", "numpy", "torch fused", "torch fused x1"):
            row[name] = float(np.median(medians[name])) if name in medians else None
        if row["torch fused x1"] is not None and row["torch fused x1"] < row["torch fused"]:
            row["torch fused"] = row["torch fused x1"]
        row.pop("torch fused x1")
        rows.append(row)
        del peers, w, g
    progress.clear()
    return rows


def plot_ratio_panels(path: str, configs: list, workloads: list, peers: list,
                      ratio: Callable[[str, str, str], float], reference: str, title: str) -> bool:
    """One panel per config, one bar per peer and workload: ``ratio(config, workload, peer)``
    (seconds per step over the reference's) on a log scale, written to ``path``. Shared by
    ``python -m fastsgd bench`` and benchmarks/bench_step.py. Returns False, writing nothing,
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    cols = min(3, len(configs))
    n_rows = math.ceil(len(configs) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 2.9 * n_rows), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(peers))
    for k, cfg in enumerate(configs):
        ax = axes[k // cols][k % cols]
        for j, p in enumerate(peers):
            ys = [ratio(cfg, w, p) for w in workloads]
            ax.bar(np.arange(len(workloads)) + (j - (len(peers) - 1) / 2) * width, ys, width, label=p,
                   color=colors(j))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(cfg, fontsize=9)
        ax.set_xticks(np.arange(len(workloads)))
        ax.set_xticklabels(workloads, fontsize=7, rotation=20)
        ax.tick_params(axis="y", labelsize=7)
        if k % cols == 0:
            ax.set_ylabel(f"time / {reference} (log)", fontsize=8)
    for k in range(len(configs), n_rows * cols):
        axes[k // cols][k % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(peers), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return True


def write_plot(path: str, rows: list) -> bool:
    """The benchmark suite's plot of ``rows`` (from :func:`run`) written to ``path``: seconds per
    step over NumPy's. Returns False, writing nothing, when matplotlib is not installed."""
    def ratio(cfg: str, w: str, p: str) -> float:
        case = [r for r in rows if r["workload"] == w and r["config"] == cfg]
        return case[0][p] / case[0][REFERENCE] if case and case[0].get(p) else float("nan")

    return plot_ratio_panels(path, list(dict.fromkeys(r["config"] for r in rows)),
                             list(dict.fromkeys(r["workload"] for r in rows)),
                             [p for p in PEERS if any(r.get(p) is not None for r in rows)], ratio, "NumPy",
                             "Seconds per step ÷ naive NumPy's (lower is better)")


def main(quick: bool = True, plot: Optional[str] = "fastsgd_bench.png") -> int:
    """Runs the benchmark (about half a minute when ``quick``), prints a table, draws the plot to
    ``plot`` (None: no plot) when matplotlib is installed, and returns 0."""
    import fastsgd

    info = fastsgd.cpu_info()
    try:
        import torch

        torch_note = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except Exception:
        torch_note = "torch not installed (skipped)"
    print(f"fastsgd {fastsgd.__version__} bench: CPU level {info['active']}, {info['threads']} threads; "
          f"NumPy {np.__version__}; {torch_note}")
    print(f"one SGD step, learning_rate={LR}; median seconds per step, peers interleaved round-robin; "
          "torch fused: the faster of its default threads and 1")
    t0 = time.perf_counter()
    rows = run(quick=quick)
    header = ["workload", "config", "fastsgd", "NumPy", "torch fused", "vs NumPy", "vs torch"]
    table = []
    for r in rows:
        f = r["fastsgd"]
        table.append([r["workload"], r["config"], _fmt(f), _fmt(r["numpy"]), _fmt(r["torch fused"]),
                      f"{r['numpy'] / f:.1f}x" if r["numpy"] else "—",
                      f"{r['torch fused'] / f:.1f}x" if r["torch fused"] else "—"])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(wd) for h, wd in zip(header, widths)))
    print("  ".join("-" * wd for wd in widths))
    for row in table:
        print("  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(row, widths))))
    print(f"(vs X = X's time / fastsgd's: how many times faster fastsgd is; {time.perf_counter() - t0:.0f} s; "
          "full suite: benchmarks/bench_step.py in the source tree)")
    if plot is not None:
        if write_plot(plot, rows):
            print(f"plot written to {os.path.abspath(plot)}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib)")
    return 0
