"""What the engine-0.2 features cost, against the one-pass C loop, in one process.

Run by hand (never a test), ideally on a quiet machine:

    python benchmarks/bench_engine.py                 # ~2 minutes
    python benchmarks/bench_engine.py --threads 2 --rounds 30

Rows, float32, on ResNet-50 shapes and on 2,000 small tensors:
  * groups: the same momentum step with every tensor in one group, and with every tensor in a
    group of its own (each with its own learning rate): groups should cost nothing;
  * the overflow check (skip_nonfinite): one extra read of the gradients, against the C loop
    of the same update (goal: at most 1.25x) and the C loop with a norm pass (the same bytes);
  * torch's rule (Convention.torch) against torch.optim.SGD(fused=True) and foreach.
And the worst difference, in float32 ulps, between fastsgd's torch rule (bit-identical to
torch's single-tensor loop) and torch's fused kernel over a few steps.

Every variant of a row is timed in blocks, round-robin in a shuffled order each round; times
are medians, ratios medians of per-round ratios. Writes bench_engine.md / .json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import peers as P  # noqa: E402
import workloads as W  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def fastsgd_step(data: P.Data, *, groups: bool = False, skip: bool = False):
    """A momentum step through the engine: one group, or one group per tensor."""
    from fastsgd import _core

    o = _core.Options()
    o.group = _core.Group(learning_rate=P.LR, momentum=P.MOMENTUM)
    o.skip_nonfinite = skip
    engine = _core.Engine(o)
    group_of = []
    if groups:
        for i in range(len(data.w)):
            group_of.append(engine.add_group(_core.Group(learning_rate=P.LR * (1 + i % 3), momentum=P.MOMENTUM)))
    engine.build(data.w, groups=group_of)
    grads = data.g
    return lambda: engine.step(grads)


def fastsgd_torch_rule(data: P.Data):
    """torch's rule with caller-owned momentum buffers, as fastsgd.torch.SGD drives it."""
    import torch
    from fastsgd import _core

    o = _core.Options()
    o.convention = _core.Convention.torch
    o.group = _core.Group(learning_rate=P.LR, momentum=P.MOMENTUM)
    o.caller_owned_slots = True
    o.slots_in_variable_dtype = True
    engine = _core.Engine(o)
    params = [p.detach() for p in data.tw]
    engine.build(params)
    buffers = [torch.zeros_like(p) for p in params]
    slots = {_core.SlotKind.momentum: buffers}
    grads = data.tg
    return lambda: engine.step(grads, slots=slots)


def torch_step(data: P.Data, **flags):
    import torch

    opt = torch.optim.SGD(data.tw, lr=P.LR, momentum=P.MOMENTUM, **flags)
    return opt.step


def c_loop(data: P.Data, config: dict, threads: int):
    loop = P.CLoop(data, config)
    loop.threads = threads
    return loop.step


def time_row(variants: dict, rounds: int, block: int) -> dict:
    """Median seconds per call of each variant, and per-round ratios to 'C loop'."""
    names = list(variants)
    for fn in variants.values():
        for _ in range(3):
            fn()
    per_round = {n: [] for n in names}
    for _ in range(rounds):
        random.shuffle(names)
        for n in names:
            fn = variants[n]
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            per_round[n].append((time.perf_counter() - t0) / block)
    base = per_round.get("C loop")
    out = {}
    for n, times in per_round.items():
        ratio = statistics.median(t / b for t, b in zip(times, base)) if base else None
        out[n] = {"seconds": statistics.median(times), "ratio_to_c_loop": ratio}
    return out


def fused_ulps(steps: int = 5) -> dict:
    """Worst float32 ulp distance between the torch rule (single-tensor loop) and torch fused."""
    import torch
    from fastsgd import _core

    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (1000,), (4096, 3)]
    worst = {}
    for nesterov, dampening, wd in [(False, 0.0, 0.0), (True, 0.0, 1e-4), (False, 0.1, 1e-4)]:
        ps = [torch.randn(s, generator=gen) for s in shapes]
        fused = [p.clone().requires_grad_(True) for p in ps]
        opt = torch.optim.SGD(fused, lr=0.05, momentum=0.9, dampening=dampening, nesterov=nesterov,
                              weight_decay=wd, fused=True)
        o = _core.Options()
        o.convention = _core.Convention.torch
        o.group = _core.Group(learning_rate=0.05, momentum=0.9, dampening=dampening, nesterov=nesterov,
                              weight_decay=wd)
        engine = _core.Engine(o)
        engine.build(ps)
        ulps = 0
        for _ in range(steps):
            gs = [torch.randn(s, generator=gen) for s in shapes]
            for f, g in zip(fused, gs):
                f.grad = g.clone()
            opt.step()
            engine.step(gs)
            for p, f in zip(ps, fused):
                a = p.view(torch.int32).to(torch.int64)
                b = f.detach().view(torch.int32).to(torch.int64)
                ulps = max(ulps, int((a - b).abs().max()))
        worst[f"nesterov={nesterov},dampening={dampening},wd={wd}"] = ulps
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="threads for fastsgd, the C loop and torch (default 1)")
    ap.add_argument("--rounds", type=int, default=15, help="round-robin rounds per row (default 15)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    args = ap.parse_args(argv)

    import fastsgd
    import torch

    fastsgd.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    doc = {"threads": args.threads, "rounds": args.rounds, "cpu": fastsgd.cpu_info(), "rows": {}}
    for workload, shapes, block in [("resnet50", W.resnet50_shapes(), 3), ("small2000", W.small_shapes(), 10)]:
        data = P.Data.make(shapes)
        variants = {
            "C loop": c_loop(data, P.CONFIGS["momentum"], args.threads),
            "C loop + norm pass": c_loop(data, P.CONFIGS["momentum_gclip"], args.threads),
            "fastsgd, 1 group": fastsgd_step(data),
            "fastsgd, a group per tensor": fastsgd_step(data, groups=True),
            "fastsgd, skip_nonfinite": fastsgd_step(data, skip=True),
            "fastsgd, torch rule": fastsgd_torch_rule(data),
            "torch fused": torch_step(data, fused=True),
            "torch foreach": torch_step(data, foreach=True),
        }
        print(f"{workload}: {len(shapes)} tensors, {data.numel:,} elements", flush=True)
        doc["rows"][workload] = time_row(variants, args.rounds, block)
    doc["fused_ulps"] = fused_ulps()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_engine.json"), "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# Engine 0.2 feature costs ({args.threads} thread(s), {args.rounds} rounds, "
             f"CPU level {doc['cpu']['active']})", ""]
    for workload, row in doc["rows"].items():
        lines += [f"## {workload}", "", "| variant | time per step | / C loop |", "| --- | --- | --- |"]
        for name, r in row.items():
            lines.append(f"| {name} | {r['seconds'] * 1e3:.3f} ms | {r['ratio_to_c_loop']:.3f} |")
        lines.append("")
    lines += ["## torch rule vs torch fused=True (float32, 5 steps, worst ulps)", ""]
    lines += [f"- {k}: {v}" for k, v in doc["fused_ulps"].items()]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "bench_engine.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
