"""fastsgd's command line: a demo, the install's CPU and CUDA status, and a quick benchmark."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

from ._progress import Progress


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
    print(f"CUDA:                     {_cuda_line(cuda)}")
    return 0


def _cuda_line(cuda: dict) -> str:
    """The CUDA status in words a user can act on."""
    if not cuda.get("built"):
        return "not available: this install was built without CUDA kernels (CPU only)"
    if not cuda.get("device_count"):
        detail = str(cuda.get("status", ""))
        if "InsufficientDriver" in detail:
            reason = "no NVIDIA driver, or one too old for this CUDA 13 build (it needs 580 or newer)"
        elif "NoDevice" in detail or "0 devices" in detail:
            reason = "no NVIDIA GPU found (or CUDA_VISIBLE_DEVICES hides them all)"
        else:
            reason = detail[detail.find("(") + 1:detail.rfind(")")] if "(" in detail else detail
        return f"kernels built in, but no usable GPU on this machine: {reason}; steps run on the CPU"
    return str(cuda["status"])


def _make_data(rng: np.random.Generator, n: int, features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs pushed through a random non-linear map: separable, but not linearly."""
    centers = rng.standard_normal((classes, features)).astype(np.float32) * 0.45
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.standard_normal((n, features)).astype(np.float32)
    mix = rng.standard_normal((features, features)).astype(np.float32) / np.sqrt(features)
    x = np.tanh(x @ mix).astype(np.float32)
    return x, y


def _init_params(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    """He-initialised weights and zero biases, layer by layer."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params.append((rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        params.append(np.zeros(fan_out, np.float32))
    return params


def _forward_backward(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float, list]:
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


class _Peer:
    """Another framework's SGD step on its own copy of the demo's weights, timed per step."""

    def __init__(self, name: str, note: str, convert: Callable[[list], list], step: Callable[[list], None],
                 weights: Callable[[], list]) -> None:
        self.name, self.note = name, note
        self.convert = convert  # NumPy gradients -> the framework's tensors, outside the timed step
        self.step, self.weights = step, weights
        self.times: list[float] = []


def _torch_peer(params: list[np.ndarray], lr: Callable[[int], float], config: dict) -> Optional[_Peer]:
    """torch.optim.SGD (momentum, Nesterov) plus Keras's decoupled weight decay and EMA written
    with torch's foreach ops: the demo's settings in torch's idiom. torch keeps unscaled gradients
    in its momentum buffer, so under a changing learning rate its weights drift from Keras's."""
    try:
        import torch
    except Exception:
        return None
    # As with BLAS above: on a few busy cores torch's OpenMP workers spin between these small
    # steps and can make each take milliseconds; one thread is both faster and steadier here.
    torch.set_num_threads(1)
    weights = [torch.tensor(p) for p in params]
    averages = [w.clone() for w in weights]
    opt = torch.optim.SGD(weights, lr=1.0, momentum=config["momentum"], nesterov=config["nesterov"])
    keep = config["ema_momentum"]
    count = [0]

    def step(grads: list) -> None:
        rate = lr(count[0])
        count[0] += 1
        for group in opt.param_groups:
            group["lr"] = rate
        for w, g in zip(weights, grads):
            w.grad = g
        with torch.no_grad():
            torch._foreach_mul_(weights, 1.0 - rate * config["weight_decay"])
            opt.step()
            torch._foreach_lerp_(averages, weights, 1.0 - keep)

    return _Peer(f"torch {torch.__version__}", "torch.optim.SGD + foreach decay and EMA; its momentum holds "
                 "unscaled gradients, so under a schedule its weights differ",
                 lambda grads: [torch.from_numpy(g) for g in grads], step,
                 lambda: [w.numpy() for w in weights])


def _keras_peer(params: list[np.ndarray], schedule_args: dict, config: dict) -> Optional[_Peer]:
    """keras.optimizers.SGD with the demo's exact settings (the rules fastsgd reproduces)."""
    if "KERAS_BACKEND" not in os.environ:
        try:
            import torch  # noqa: F401

            os.environ["KERAS_BACKEND"] = "torch"
        except Exception:
            pass
    try:
        import keras  # type: ignore[import-untyped]
    except Exception:
        return None
    variables = [keras.Variable(p) for p in params]
    opt = keras.optimizers.SGD(learning_rate=keras.optimizers.schedules.CosineDecay(**schedule_args), **config)
    opt.build(variables)
    return _Peer(f"Keras {keras.__version__} ({keras.backend.backend()})", "keras.optimizers.SGD",
                 lambda grads: [keras.ops.convert_to_tensor(g) for g in grads],
                 lambda grads: opt.apply(grads, variables),
                 lambda: [keras.ops.convert_to_numpy(v) for v in variables])


def demo(args: argparse.Namespace) -> int:
    """Trains a NumPy MLP with fastsgd (Nesterov momentum, cosine schedule, EMA) and times the
    update step against the plain NumPy reference implementation of the same rules, and against
    torch's and Keras's SGD on the same model where they are installed."""
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
    config: dict[str, Any] = dict(momentum=0.9, nesterov=True, use_ema=True, ema_momentum=0.98, weight_decay=1e-4)
    lr = schedules.CosineDecay(**schedule_args)
    opt = fastsgd.SGD(learning_rate=lr, **config)
    ref = reference.ReferenceSGD(learning_rate=schedules.CosineDecay(**schedule_args), **config)
    peers: list[_Peer] = []
    if not args.no_frameworks:
        torch_peer = _torch_peer(params, lambda i: float(lr(i)), config)
        keras_peer = _keras_peer(params, schedule_args, config)
        peers = [p for p in (torch_peer, keras_peer) if p is not None]
    n_params = sum(p.size for p in params)
    print(f"fastsgd {fastsgd.__version__} demo: MLP {features}-256-256-{classes} ({n_params:,} parameters), "
          f"{split} samples, batch {args.batch}")
    print(f"SGD(momentum=0.9, nesterov=True, CosineDecay 0.1 -> 0.005, weight_decay=1e-4, EMA 0.98); "
          f"CPU level {fastsgd.cpu_info()['active']}")
    if peers:
        print("the same step also runs in: " + ", ".join(f"{p.name} ({p.note})" for p in peers))
    elif not args.no_frameworks:
        print("torch and Keras are not installed: comparing with the NumPy reference only")
    t_fast: list[float] = []
    t_ref: list[float] = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(split)
        losses, accs = [], []
        progress = Progress(steps_per_epoch)
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
            for peer in peers:
                own = peer.convert(grads)
                t0 = time.perf_counter()
                peer.step(own)
                peer.times.append(time.perf_counter() - t0)
            if b % 8 == 0 or b == steps_per_epoch - 1:
                progress.update(b + 1, f"epoch {epoch}/{args.epochs} loss {np.mean(losses):.4f}")
        progress.clear()
        _, test_acc, _ = _forward_backward(params, x_test, y_test)
        print(f"epoch {epoch}/{args.epochs}  loss {np.mean(losses):.4f}  train acc {np.mean(accs):.3f}  "
              f"test acc {test_acc:.3f}  lr {opt.learning_rate:.4f}")
    ema_params = [p.copy() for p in params]
    opt.finalize_variable_values(ema_params)
    _, ema_acc, _ = _forward_backward(ema_params, x_test, y_test)
    print(f"test accuracy with EMA weights: {ema_acc:.3f}")
    fast = float(np.median(t_fast))
    print(f"update step, median of {len(t_fast)} (lower is better):")
    rows = [("fastsgd", fast, params), ("NumPy reference", float(np.median(t_ref)), twin)]
    rows += [(p.name, float(np.median(p.times)), p.weights()) for p in peers]
    width = max(len(name) for name, _, _ in rows)
    for name, seconds, weights in rows:
        drift = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(params, weights))
        versus = "" if name == "fastsgd" else f"  fastsgd {seconds / fast:.1f}x faster; max |difference| {drift:.2e}"
        print(f"  {name.ljust(width)}  {1e6 * seconds:9.1f} us{versus}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Quick benchmark of fastsgd against NumPy and torch (when installed) on this machine."""
    from . import _bench

    return _bench.main(quick=not args.full, plot=None if args.no_plot else args.plot)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the epilog's line breaks."""


def _version() -> str:
    """The installed version, read without loading the native module (so --version always works)."""
    try:
        from importlib.metadata import version

        return version("fastsgd")
    except Exception:
        import fastsgd

        return str(fastsgd.__version__)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m fastsgd``."""
    parser = argparse.ArgumentParser(
        prog="python -m fastsgd", description=__doc__, formatter_class=_Formatter,
        epilog="examples:\n  python -m fastsgd demo\n  python -m fastsgd info\n  python -m fastsgd bench")
    parser.add_argument("--version", action="version", version=f"fastsgd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,info,bench}")
    p_demo = sub.add_parser("demo", formatter_class=_Formatter, help="train a small NumPy MLP with fastsgd",
                            description="Trains a 32-256-256-8 MLP on synthetic data with fastsgd and compares\n"
                                        "its update step with the NumPy reference, and with torch's and Keras's\n"
                                        "SGD where they are installed.")
    p_demo.add_argument("--epochs", type=int, default=6, help="passes over the 10,000 training samples")
    p_demo.add_argument("--batch", type=int, default=128, help="samples per step")
    p_demo.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights")
    p_demo.add_argument("--no-frameworks", action="store_true",
                        help="skip the torch and Keras comparison even where they are installed")
    p_demo.set_defaults(fn=demo)
    p_info = sub.add_parser("info", formatter_class=_Formatter, help="version, CPU levels, threads, CUDA status",
                            description="Shows what this install of fastsgd uses on this machine.")
    p_info.add_argument("--cmake-dir", action="store_true",
                        help="print only the CMake package directory (for -Dfastsgd_DIR=...)")
    p_info.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    p_info.set_defaults(fn=info)
    p_bench = sub.add_parser("bench", formatter_class=_Formatter, help="quick speed comparison on this machine",
                             description="Times one SGD step of fastsgd, naive NumPy and torch's fused SGD\n"
                                         "(when installed); with matplotlib, also draws the result.")
    p_bench.add_argument("--full", action="store_true", help="more workloads and configs (several minutes)")
    p_bench.add_argument("--plot", default="fastsgd_bench.png", help="where to write the plot")
    p_bench.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    p_bench.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
