"""``optimizer.step()`` as a torch training loop calls it: fastsgd.torch.SGD against
torch.optim.SGD (fused=True, foreach, for-loop), plus the fixed Python cost of a step.

    python benchmarks/bench_torch_step.py                 # ~3-5 min on 2 vCPUs
    python benchmarks/bench_torch_step.py --rounds 3 --workloads resnet50,small2000

Same method as bench_step.py (its measuring code is reused): every (peer, thread count) runs in
blocks, round-robin in a shuffled order each round, in this one process; times are medians of
every timed call. Speed-ups compare each side at its best thread count. Gradients are set once
(``p.grad``) and every peer steps the same parameters with its own momentum buffers. "C loop" is bench_step.py's
one-pass C loop of the same update (the memory roofline): "fused ÷ C loop" is the most any
optimizer could gain over torch fused on this machine.

Fixed cost per step, on ResNet-50's 161 tensors shrunk to one element each (so the kernel is
negligible), at 1 thread:
  * ``step()``:           fastsgd.torch.SGD().step()
  * ``engine``:           the same engine call with the lists already built
                          (engine.step(grads, None, slots=...)): DLPack import of every tensor
                          and the native walk
  * ``adapter``:          step() - engine, paired call by call: the Python this module adds
  * ``reading .grad``:    [p.grad for p in params] alone, part of the adapter's cost
  * torch fused step() on the same tensors, for scale.
Writes bench_torch_step.md and bench_torch_step.json to --out (benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import bench_step as B  # noqa: E402
import peers as P  # noqa: E402
import workloads as W  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = [P.FastSGDTorchOptimizer, P.TorchFused, P.TorchForeach, P.TorchForLoop, P.CLoop]
GOALS = {"resnet50": 1.3, "small2000": 3.0}
OVERHEAD_GOAL_US = 15.0


def best(records: list, workload: str, peer: str) -> dict:
    rs = [r for r in records if r["workload"] == workload and r["peer"] == peer]
    return min(rs, key=lambda r: r["median_s"])


def fixed_cost(rounds: int) -> dict:
    """Per-step Python cost on 161 one-element tensors at 1 thread (see the module docstring)."""
    import torch

    import fastsgd
    import fastsgd.torch

    B.set_threads(1)
    shapes = [tuple(1 for _ in s) for s in W.resnet50_shapes()]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = fastsgd.torch.SGD(params, lr=P.LR, momentum=P.MOMENTUM)
    opt.step()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    fused = torch.optim.SGD(twins, lr=P.LR, momentum=P.MOMENTUM, fused=True)
    fused.step()
    engine = opt.engine
    grads = [p.grad for p in params]
    slots = {fastsgd._core.SlotKind.momentum: [opt.state[p]["momentum_buffer"] for p in params]}

    def engine_step():
        engine.step(grads, None, slots=slots)

    def read_grads():
        [p.grad for p in params]  # noqa: B018

    rows: dict = {"step": [], "engine": [], "adapter": [], "grad": [], "fused": []}
    clock = time.perf_counter
    for r in range(rounds):
        for _ in range(200):
            t0 = clock()
            opt.step()
            t1 = clock()
            engine_step()
            t2 = clock()
            read_grads()
            t3 = clock()
            rows["step"].append(t1 - t0)
            rows["engine"].append(t2 - t1)
            rows["adapter"].append((t1 - t0) - (t2 - t1))
            rows["grad"].append(t3 - t2)
        for _ in range(50):
            t0 = clock()
            fused.step()
            rows["fused"].append(clock() - t0)
        B.progress(f"fixed cost  round {r + 1}/{rounds}")
    out = {k: float(np.median(v)) * 1e6 for k, v in rows.items()}
    out["adapter_iqr"] = [float(np.percentile(rows["adapter"], q)) * 1e6 for q in (25, 75)]
    out["adapter_minus_grad"] = out["adapter"] - out["grad"]
    return out


def write_markdown(path: str, doc: dict) -> None:
    m = doc["machine"]
    lines = [f"# optimizer.step(): fastsgd.torch.SGD vs torch.optim.SGD — {doc['date']}", "",
             f"{m.get('cpu_model')}, {m.get('cpus')} CPUs; torch {m.get('torch')}, fastsgd {m.get('fastsgd')}; "
             f"load average before {doc['load_before']}, after {doc['load_after']}.", "",
             f"Config: momentum {P.MOMENTUM}, lr {P.LR}, float32. Rounds: {doc['rounds']}. "
             "Median seconds per `step()`; threads in parentheses.", "",
             "| workload | fastsgd.torch.SGD | torch fused | torch foreach | torch for-loop | C loop (roofline) "
             "| ÷ fused (best threads) | fused ÷ C loop | goal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for wl in doc["workloads"]:
        cells = []
        for peer in [c.name for c in PEERS]:
            try:
                r = best(doc["records"], wl, peer)
                cells.append(f"{B.fmt_time(r['median_s'])} ({r['threads']})")
            except ValueError:
                cells.append("—")
        s = doc["speedups"].get(wl)
        goal = GOALS.get(wl)
        try:
            fused = best(doc["records"], wl, P.TorchFused.name)["median_s"]
            room = fused / best(doc["records"], wl, P.CLoop.name)["median_s"]
        except ValueError:
            room = float("nan")
        lines.append(f"| {wl} | " + " | ".join(cells) + f" | {s:.2f}× | {room:.2f}× | " +
                     (f"≥ {goal}× {'met' if s >= goal else 'NOT met'}" if goal else "—") + " |")
    f = doc["fixed_cost"]
    lines += ["", "## Fixed cost per step (161 one-element tensors, 1 thread, medians)", "",
              "| step() | engine call | adapter (step − engine) | of which reading .grad | adapter without .grad "
              "| torch fused step() |",
              "| --- | --- | --- | --- | --- | --- |",
              f"| {f['step']:.1f} µs | {f['engine']:.1f} µs | {f['adapter']:.1f} µs "
              f"(IQR {f['adapter_iqr'][0]:.1f}–{f['adapter_iqr'][1]:.1f}) | {f['grad']:.1f} µs | "
              f"{f['adapter_minus_grad']:.1f} µs | {f['fused']:.1f} µs |", "",
              f"Goal: adapter ≤ {OVERHEAD_GOAL_US} µs per step for 161 tensors.", "",
              "## All rows", "", "| workload | peer | threads | median | p25–p75 |",
              "| --- | --- | --- | --- | --- |"]
    for r in doc["records"]:
        lines.append(f"| {r['workload']} | {r['peer']} | {r['threads']} | {B.fmt_time(r['median_s'])} | "
                     f"{B.fmt_time(r['p25_s'])}–{B.fmt_time(r['p75_s'])} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="resnet50,bert_base,small2000")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all CPUs)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-ms", type=float, default=150.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="bench_torch_step")
    args = ap.parse_args(argv)
    workloads = args.workloads.split(",")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, os.cpu_count() or 1})
    rng = np.random.default_rng(0)
    load_before = B.load_average()
    records = []
    for wl in workloads:
        desc, shapes = W.WORKLOADS[wl]
        data = P.Data.make(shapes, seed=0)
        variants, skipped = B.measure_case(data, "momentum", PEERS, threads, args.rounds, args.block_ms / 1e3, rng,
                                           label=wl)
        if skipped:
            print(f"{wl}: skipped {skipped}", file=sys.stderr)
        records += B.summarise(wl, "momentum", data.numel, variants)
        del data, variants
    speedups = {}
    for wl in workloads:
        ours, fused = best(records, wl, P.FastSGDTorchOptimizer.name), best(records, wl, P.TorchFused.name)
        speedups[wl] = fused["median_s"] / ours["median_s"]
    doc = {"date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "machine": B.machine_info(), "rounds": args.rounds,
           "threads": threads, "workloads": workloads, "records": records, "speedups": speedups,
           "fixed_cost": fixed_cost(args.rounds), "load_before": load_before, "load_after": B.load_average()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".json"), "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    write_markdown(os.path.join(args.out, args.name + ".md"), doc)
    print(open(os.path.join(args.out, args.name + ".md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
