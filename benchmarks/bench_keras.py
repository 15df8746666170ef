"""The Keras row: keras.optimizers.SGD vs fastsgd.keras.SGD, inside Keras (torch backend).

Run by hand (never a test), on a quiet machine:

    KERAS_BACKEND=torch python benchmarks/bench_keras.py            # ~5 min on 2 vCPUs
    python benchmarks/bench_keras.py --quick                        # ~2 min

Two parts, both in this one process with the peers interleaved (bench_step.py's machinery):

1. ``optimizer.apply(grads, variables)`` on the ``keras.Variable``s of a model shaped like
   ResNet-50 (161 tensors, 25.6M) and of one with many small layers (2,000 tensors of
   1..4096 elements), per config; seconds per step and the paired ratio keras ÷ fastsgd.keras.
   Both sides run at the same thread count (torch's and fastsgd's threads set alike).
2. One ``model.fit`` epoch end to end of a small MLP (Dense 64 -> 256 -> 256 -> 10, 8,192
   samples, batch 64: 128 steps), each optimizer alternately, median over rounds.

Writes bench_keras.md and bench_keras.json to --out (benchmarks/results).
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
PEERS = [P.KerasSGD, P.FastSGDKeras]
#: (workload, config) -> the issue's goal for keras ÷ fastsgd.keras
GOALS = {("resnet50", "momentum"): 2.0, ("resnet50", "momentum_ema"): 5.0, ("small2000", "momentum"): 10.0}


def measure_apply(workloads: list, configs: list, threads: list, rounds: int, block_s: float) -> list:
    """Per (workload, config, threads): both peers' median seconds per step and the paired ratio."""
    rng = np.random.default_rng(0)
    rows = []
    for wl in workloads:
        data = P.Data.make(W.WORKLOADS[wl][1])
        for cfg in configs:
            variants, skipped = B.measure_case(data, cfg, PEERS, threads, rounds, block_s, rng, f"{wl} {cfg}")
            if skipped:
                raise RuntimeError(f"{wl} {cfg}: {skipped}")
            for t in threads:
                keras_v = next(v for v in variants if v.peer.name == "keras" and v.threads == t)
                fast_v = next(v for v in variants if v.peer.name == "fastsgd.keras" and v.threads == t)
                rows.append({"workload": wl, "config": cfg, "threads": t,
                             "keras_s": float(np.median(keras_v.times())),
                             "fastsgd_keras_s": float(np.median(fast_v.times())),
                             "ratio": B.paired_ratio(keras_v, fast_v),
                             "goal": GOALS.get((wl, cfg))})
        del data
    return rows


def measure_fit(rounds: int, config: dict) -> dict:
    """Seconds of one model.fit epoch (128 steps) with each optimizer, alternately."""
    import keras

    import fastsgd.keras

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8192, 64)).astype(np.float32)
    y = rng.integers(0, 10, 8192).astype(np.int32)

    def model_with(opt_cls):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"),
                                  keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
        model.compile(optimizer=opt_cls(learning_rate=P.LR, **config),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # warm-up epoch (builds everything)
        return model

    models = {"keras": model_with(keras.optimizers.SGD), "fastsgd.keras": model_with(fastsgd.keras.SGD)}
    times: dict = {k: [] for k in models}
    for r in range(rounds):
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            t0 = time.perf_counter()
            models[name].fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
            times[name].append(time.perf_counter() - t0)
    k, f = np.median(times["keras"]), np.median(times["fastsgd.keras"])
    return {"config": config, "steps": 128, "keras_s": float(k), "fastsgd_keras_s": float(f),
            "ratio": float(k / f), "times": times}


def write_markdown(path: str, doc: dict) -> None:
    lines = ["# Keras row: keras.optimizers.SGD vs fastsgd.keras.SGD", "",
             f"Run {doc['started']} ({doc['elapsed_min']:.1f} min), load average before {doc['load_before']} "
             f"/ after {doc['load_after']}; {doc['machine']['cpu_model']}, {doc['machine']['cpus']} CPUs; "
             f"torch {doc['machine']['torch']}, Keras {doc['machine']['keras']} (torch backend), "
             f"fastsgd {doc['machine'].get('fastsgd')}.", "",
             "## optimizer.apply(grads, variables) on keras.Variables, seconds per step (median)", "",
             "Both sides at the same thread count (torch's and fastsgd's). `keras ÷ fastsgd.keras` is the "
             "median over rounds of paired per-round ratios.", "",
             "| workload | config | threads | keras | fastsgd.keras | keras ÷ fastsgd.keras | goal |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["apply"]:
        goal = f"≥ {r['goal']:g} {'met' if r['ratio'] >= r['goal'] else 'NOT met'}" if r["goal"] else ""
        lines.append(f"| {r['workload']} | {r['config']} | {r['threads']} | {B.fmt_time(r['keras_s'])} | "
                     f"{B.fmt_time(r['fastsgd_keras_s'])} | {r['ratio']:.2f} | {goal} |")
    f = doc["fit"]
    lines += ["", "## One model.fit epoch end to end", "",
              f"MLP 64 → 256 → 256 → 10 (relu), 8,192 samples, batch 64 ({f['steps']} steps), "
              f"SGD {f['config']}, all threads; median of {len(f['times']['keras'])} epochs each.", "",
              "| keras | fastsgd.keras | keras ÷ fastsgd.keras |", "|---|---|---|",
              f"| {f['keras_s']:.3f} s | {f['fastsgd_keras_s']:.3f} s | {f['ratio']:.2f} |", "",
              "A small model's epoch is dominated by the forward/backward pass and Keras's loop; the "
              "optimizer's share, not the whole epoch, is what fastsgd speeds up.", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds, momentum and momentum_ema only")
    ap.add_argument("--workloads", default="resnet50,small2000")
    ap.add_argument("--configs", help=f"comma list of {list(P.CONFIGS)}")
    ap.add_argument("--threads", help="comma list of thread counts (default: 1 and all CPUs)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--fit-rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="bench_keras")
    args = ap.parse_args(argv)
    for peer in PEERS:
        reason = peer.available()
        if reason:
            print(f"cannot run: {peer.name}: {reason}", file=sys.stderr)
            return 2
    workloads = B.parse_list(args.workloads, list(W.WORKLOADS), "workload")
    configs = B.parse_list(args.configs, list(P.CONFIGS), "config") if args.configs else \
        (["momentum", "momentum_ema"] if args.quick else ["plain", "momentum", "nesterov", "momentum_wd",
                                                           "momentum_ema", "momentum_gclip"])
    cpus = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cpus})
    rounds = args.rounds or (3 if args.quick else 7)
    started, t0, load_before = datetime.datetime.now(), time.time(), B.load_average()
    apply_rows = measure_apply(workloads, configs, threads, rounds, 0.04)
    B.set_threads(max(threads))
    fit = measure_fit(args.fit_rounds, dict(momentum=P.MOMENTUM))
    doc = {"started": f"{started:%Y-%m-%d %H:%M}", "elapsed_min": (time.time() - t0) / 60,
           "load_before": load_before, "load_after": B.load_average(), "machine": B.machine_info(),
           "apply": apply_rows, "fit": fit}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    write_markdown(os.path.join(args.out, f"{args.name}.md"), doc)
    print(open(os.path.join(args.out, f"{args.name}.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
