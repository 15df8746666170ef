"""Command line: ``python -m fastsgd {demo,info,bench}``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _bar(done: int, total: int, width: int = 28) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def info(args: argparse.Namespace) -> int:
    """Prints the version, CPU levels, threads and CUDA status (or the CMake package dir)."""
    import fastsgd

    if args.cmake_dir:
        from . import _cmake

        try:
            print(_cmake.get_cmake_dir())
        except FileNotFoundError as exc:
            print(f"fastsgd: {exc}", file=sys.stderr)
            return 1
        return 0
    cpu = fastsgd.cpu_info()
    cuda = fastsgd.cuda_info()
    if args.json:
        print(json.dumps({"version": fastsgd.__version__, "cpu": cpu, "cuda": cuda}))
        return 0
    print(f"fastsgd {fastsgd.__version__}")
    print(f"CPU ISA levels available: {', '.join(cpu['available'])}")
    print(f"CPU ISA level in use:     {cpu['active']}  (FASTSGD_CPU_ISA overrides)")
    print(f"CPU threads:              {cpu['threads']}  (FASTSGD_NUM_THREADS overrides)")
    print(f"CUDA:                     {cuda['status']}")
    return 0


def _make_data(rng: np.random.Generator, n: int, features: int, classes: int):
    """Gaussian blobs pushed through a random non-linear map: separable, but not linearly."""
    centers = rng.standard_normal((classes, features)).astype(np.float32) * 0.45
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.standard_normal((n, features)).astype(np.float32)
    mix = rng.standard_normal((features, features)).astype(np.float32) / np.sqrt(features)
    x = np.tanh(x @ mix).astype(np.float32)
    return x, y


def _init_params(rng: np.random.Generator, sizes):
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params.append((rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        params.append(np.zeros(fan_out, np.float32))
    return params


def _forward_backward(params, x, y):
    """Softmax cross-entropy of a ReLU MLP; returns (loss, accuracy, grads)."""
    acts = [x]
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n_layers - 1:
            h = np.maximum(h, 0)
        acts.append(h)
    logits = acts[-1]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    acc = float((p.argmax(axis=1) == y).mean())
    d = p
    d[np.arange(n), y] -= 1
    d /= n
    grads = [None] * len(params)
    for i in reversed(range(n_layers)):
        grads[2 * i] = (acts[i].T @ d).astype(np.float32)
        grads[2 * i + 1] = d.sum(axis=0).astype(np.float32)
        if i > 0:
            d = (d @ params[2 * i].T) * (acts[i] > 0)
    return loss, acc, grads


def demo(args: argparse.Namespace) -> int:
    """Trains a NumPy MLP with fastsgd (Nesterov momentum, cosine schedule, EMA) and times the
    update step against the plain NumPy reference implementation of the same rules."""
    if "OPENBLAS_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        # On a few cores, BLAS threads spin between these small matmuls and starve everything
        # else; the demo runs BLAS single-threaded unless told otherwise.
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        os.execve(sys.executable, [sys.executable, "-m", "fastsgd"] + sys.argv[1:], env)
    import fastsgd
    from fastsgd import reference, schedules

    rng = np.random.default_rng(args.seed)
    features, classes = 32, 8
    x, y = _make_data(rng, 12000, features, classes)
    split = 10000
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    params = _init_params(rng, [features, 256, 256, classes])
    twin = [p.copy() for p in params]
    steps_per_epoch = split // args.batch
    schedule_args = dict(initial_learning_rate=0.1, decay_steps=args.epochs * steps_per_epoch, alpha=0.05)
    config = dict(momentum=0.9, nesterov=True, use_ema=True, ema_momentum=0.98, weight_decay=1e-4)
    opt = fastsgd.SGD(learning_rate=schedules.CosineDecay(**schedule_args), **config)
    ref = reference.ReferenceSGD(learning_rate=schedules.CosineDecay(**schedule_args), **config)
    n_params = sum(p.size for p in params)
    print(f"fastsgd {fastsgd.__version__} demo: MLP {features}-256-256-{classes} ({n_params:,} parameters), "
          f"{split} samples, batch {args.batch}")
    print(f"SGD(momentum=0.9, nesterov=True, CosineDecay 0.1 -> 0.005, weight_decay=1e-4, EMA 0.98); "
          f"CPU level {fastsgd.cpu_info()['active']}")
    t_fast, t_ref = [], []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(split)
        losses, accs = [], []
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            loss, acc, grads = _forward_backward(params, x_train[idx], y_train[idx])
            losses.append(loss)
            accs.append(acc)
            t0 = time.perf_counter()
            opt.apply(grads, params)
            t1 = time.perf_counter()
            ref.apply(grads, twin)
            t2 = time.perf_counter()
            t_fast.append(t1 - t0)
            t_ref.append(t2 - t1)
            if b % 8 == 0 or b == steps_per_epoch - 1:
                sys.stderr.write(f"\r  epoch {epoch}/{args.epochs} {_bar(b + 1, steps_per_epoch)} "
                                 f"loss {np.mean(losses):.4f}")
                sys.stderr.flush()
        sys.stderr.write("\r" + " " * 78 + "\r")
        _, test_acc, _ = _forward_backward(params, x_test, y_test)
        print(f"epoch {epoch}/{args.epochs}  loss {np.mean(losses):.4f}  train acc {np.mean(accs):.3f}  "
              f"test acc {test_acc:.3f}  lr {opt.learning_rate:.4f}")
    ema_params = [p.copy() for p in params]
    opt.finalize_variable_values(ema_params)
    _, ema_acc, _ = _forward_backward(ema_params, x_test, y_test)
    drift = max(float(np.max(np.abs(a - b))) for a, b in zip(params, twin))
    print(f"test accuracy with EMA weights: {ema_acc:.3f}")
    fast, slow = float(np.median(t_fast)), float(np.median(t_ref))
    print(f"update step, median of {len(t_fast)}: fastsgd {1e6 * fast:.1f} us, "
          f"NumPy reference {1e6 * slow:.1f} us (fastsgd {slow / fast:.1f}x faster)")
    print(f"max |fastsgd - reference| over all weights: {drift:.2e}; total time {time.perf_counter() - start:.1f} s")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Quick benchmark of fastsgd against NumPy and torch (when installed) on this machine."""
    from . import _bench

    return _bench.main(quick=not args.full)


def main(argv=None) -> int:
    """Entry point of ``python -m fastsgd``."""
    parser = argparse.ArgumentParser(prog="python -m fastsgd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a small NumPy MLP with fastsgd")
    p_demo.add_argument("--epochs", type=int, default=6)
    p_demo.add_argument("--batch", type=int, default=128)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(fn=demo)
    p_info = sub.add_parser("info", help="version, CPU levels, threads, CUDA status")
    p_info.add_argument("--cmake-dir", action="store_true", help="print the CMake package directory")
    p_info.add_argument("--json", action="store_true")
    p_info.set_defaults(fn=info)
    p_bench = sub.add_parser("bench", help="quick speed comparison on this machine")
    p_bench.add_argument("--full", action="store_true", help="all workloads (slower)")
    p_bench.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
