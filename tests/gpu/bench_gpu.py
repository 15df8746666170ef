"""GPU benchmark: bert-base-shaped SGD steps, fastsgd vs torch.optim.SGD(fused=True), and the
achieved memory bandwidth against a device-to-device copy.

    PYTHONPATH=<dir with fastsgd> python tests/gpu/bench_gpu.py [--steps 50] [--out bench.json]

Timing: CUDA events around `steps` back-to-back steps after warm-up (no synchronisation inside),
best of `--repeats` runs; the host time per call (Python + DLPack + launch, without waiting for
the GPU) is reported separately. Bytes per step count each array once per read or write:
plain SGD 3 accesses per element (w, g in; w out), momentum 5 (w, g, m in; w, m out).
"""

import argparse
import json
import platform
import sys
import time

import torch

import fastsgd


def bert_base_shapes(vocab=30522, hidden=768, layers=12, inter=3072, positions=512, types=2):
    shapes = [(vocab, hidden), (positions, hidden), (types, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(inter, hidden), (inter,), (hidden, inter), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def cuda_time(fn, steps, repeats):
    """Best milliseconds per call over `repeats` runs of `steps` calls."""
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / steps)
    return best


def host_time(fn, steps):
    """Microseconds of host time per call (the GPU may still be busy)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / steps * 1e6


def copy_bandwidth(nbytes, steps, repeats):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), steps, repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9  # read + write


def bench_case(name, shapes, dtype, fastsgd_kwargs, torch_kwargs, bytes_per_element, steps, repeats,
               warmup=5):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=torch.float32, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, device="cuda", dtype=torch.float32, generator=gen).mul_(1e-3).to(dtype)
             for s in shapes]
    n = sum(p.numel() for p in params)
    result = {"case": name, "dtype": str(dtype).replace("torch.", ""), "tensors": len(params), "elements": n}

    if "engine" in fastsgd_kwargs:
        # The native engine directly: torch's rule, skip_nonfinite (one measuring pass and a
        # host sync per step), which the Keras-shaped facade does not expose.
        core = fastsgd._core
        options = core.Options()
        for key, value in fastsgd_kwargs["engine"].items():
            setattr(options, key, value)
        options.group = core.Group(learning_rate=0.01, **fastsgd_kwargs.get("group", {}))
        engine = core.Engine(options)
        engine.build(params)
        step = lambda: engine.step(grads)  # noqa: E731
    else:
        opt = fastsgd.SGD(learning_rate=0.01, **fastsgd_kwargs)
        step = lambda: opt.apply(grads, params)  # noqa: E731
    for _ in range(warmup):
        step()
    ms = cuda_time(step, steps, repeats)
    result["fastsgd_ms"] = ms
    result["fastsgd_GBps"] = n * bytes_per_element / (ms * 1e-3) / 1e9
    result["fastsgd_host_us_per_call"] = host_time(step, steps)

    if torch_kwargs is not None:
        tparams = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, g in zip(tparams, grads):
            p.grad = g
        for label, extra in (("torch_fused", {"fused": True}), ("torch_foreach", {"foreach": True})):
            try:
                topt = torch.optim.SGD(tparams, lr=0.01, **torch_kwargs, **extra)
            except (RuntimeError, TypeError, ValueError) as e:  # e.g. fused unsupported for a dtype
                result[f"{label}_error"] = str(e)
                continue
            for _ in range(warmup):
                topt.step()
            tms = cuda_time(topt.step, steps, repeats)
            result[f"{label}_ms"] = tms
            result[f"{label}_GBps"] = n * bytes_per_element / (tms * 1e-3) / 1e9
            result[f"speedup_vs_{label}"] = tms / ms
        del tparams
    del params, grads, opt
    torch.cuda.empty_cache()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    info = fastsgd.cuda_info()
    if not info["device_count"]:
        print(f"fastsgd has no usable CUDA device: {info['status']}", file=sys.stderr)
        return 1

    shapes = bert_base_shapes()
    cases = [
        # name, dtype, fastsgd kwargs, torch kwargs (None: no torch equivalent), bytes per element
        ("momentum", torch.float32, {"momentum": 0.9}, {"momentum": 0.9}, 5 * 4),
        ("plain", torch.float32, {}, {}, 3 * 4),
        ("nesterov_wd", torch.float32, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
         {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}, 5 * 4),
        ("torch_rule_momentum_l2", torch.float32,
         {"engine": {"convention": fastsgd._core.Convention.torch},
          "group": {"momentum": 0.9, "weight_decay": 1e-4}},
         {"momentum": 0.9, "weight_decay": 1e-4}, 5 * 4),
        ("torch_rule_nesterov_maximize", torch.float32,
         {"engine": {"convention": fastsgd._core.Convention.torch},
          "group": {"momentum": 0.9, "nesterov": True, "maximize": True}},
         {"momentum": 0.9, "nesterov": True, "maximize": True}, 5 * 4),
        # skip_nonfinite: a measuring pass (reads g) and a host sync before the update.
        ("momentum_skip_nonfinite", torch.float32,
         {"engine": {"skip_nonfinite": True}, "group": {"momentum": 0.9}}, None, 6 * 4),
        ("momentum_global_clipnorm", torch.float32, {"momentum": 0.9, "global_clipnorm": 1.0}, None, 6 * 4),
        ("momentum_clipnorm", torch.float32, {"momentum": 0.9, "clipnorm": 1.0}, None, 6 * 4),
        # bf16 variables, float32 momentum: 2+2+4 in, 2+4 out
        ("momentum_bf16_fp32_slots", torch.bfloat16, {"momentum": 0.9}, None, 2 + 2 + 4 + 2 + 4),
        ("momentum_bf16", torch.bfloat16, {"momentum": 0.9, "slot_dtype": "variable"}, {"momentum": 0.9}, 5 * 2),
    ]
    copy_bytes = 1 << 30
    report = {
        "device": torch.cuda.get_device_name(0),
        "fastsgd_cuda_info": info["status"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "steps": args.steps,
        "repeats": args.repeats,
        "d2d_copy_GBps": copy_bandwidth(copy_bytes, 20, args.repeats),
        "results": [],
    }
    for name, dtype, fkw, tkw, bpe in cases:
        r = bench_case(name, shapes, dtype, fkw, tkw, bpe, args.steps, args.repeats)
        r["fraction_of_copy_bandwidth"] = r["fastsgd_GBps"] / report["d2d_copy_GBps"]
        report["results"].append(r)
        line = f"{name:28s} {r['dtype']:9s} fastsgd {r['fastsgd_ms']:7.3f} ms {r['fastsgd_GBps']:7.0f} GB/s " \
               f"({100 * r['fraction_of_copy_bandwidth']:3.0f}% of copy), host {r['fastsgd_host_us_per_call']:6.0f} us"
        for label in ("torch_fused", "torch_foreach"):
            if f"{label}_ms" in r:
                line += f" | {label} {r[f'{label}_ms']:7.3f} ms (x{r[f'speedup_vs_{label}']:.2f})"
        print(line, flush=True)
    print(f"device-to-device copy: {report['d2d_copy_GBps']:.0f} GB/s ({report['device']})")
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
