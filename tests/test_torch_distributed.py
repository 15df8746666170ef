"""fastsgd.torch.SGD across two processes on torch.distributed (gloo, 127.0.0.1, a free port):
DDP, ZeroRedundancyOptimizer (ZeRO-1) and FSDP2 (fully_shard: DTensor parameters, global_clipnorm
and the non-finite skip decided over both ranks with one all-reduce, sharded checkpoints through
torch.distributed.checkpoint).

One spawn runs every scenario (process start and `import torch` dominate the cost); each test
then checks its scenario's results against a single-process run computed here."""

import os
import sys
from pathlib import Path
import socket
import tempfile
import time
import traceback

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional framework")
dist = pytest.importorskip("torch.distributed", reason="torch built without distributed")
if not dist.is_available():
    pytest.skip("torch built without distributed", allow_module_level=True)

import fastsgd.torch as ftorch  # noqa: E402

WORLD = 2
TIMEOUT_S = 150
STEPS = 3
CLIP = 0.05


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)


def shard(t, rank):
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def train(model, opt, x, y, steps=STEPS, start=0):
    for _ in range(start, steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def full(model):
    """Parameters as plain full tensors (DTensors gathered)."""
    out = []
    for p in model.parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out.append(t.clone())
    return out


# ---- scenarios, run on every rank ------------------------------------------------------------


def scenario_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = batch()
    ddp = DDP(make_model())
    opt = ftorch.SGD(ddp.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    train(ddp, opt, shard(x, rank), shard(y, rank))
    return {"params": full(ddp.module)}


def scenario_zero(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer as ZeRO
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = batch()
    out = {}
    for name, cls, extra in (("ours", ftorch.SGD, {}), ("torch", torch.optim.SGD, {"foreach": False})):
        ddp = DDP(make_model())
        opt = ZeRO(ddp.parameters(), optimizer_class=cls, lr=0.1, momentum=0.9, weight_decay=1e-3, **extra)
        train(ddp, opt, shard(x, rank), shard(y, rank))
        opt.consolidate_state_dict(to=0)
        sd = opt.state_dict() if rank == 0 else None
        out[name] = full(ddp.module)
        if rank == 0:
            out[name + "_buffers"] = [sd["state"][i]["momentum_buffer"].clone() for i in sorted(sd["state"])]
        # Reload the consolidated state and keep training: ZeRO writes optim.state[p] directly.
        if name == "ours":
            sd_all = [None]
            if rank == 0:
                sd_all = [sd]
            dist.broadcast_object_list(sd_all, src=0)
            opt.load_state_dict(sd_all[0])
            train(ddp, opt, shard(x, rank), shard(y, rank), steps=STEPS + 2, start=STEPS)
            out["ours_resumed"] = full(ddp.module)
    return out


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def scenario_fsdp_clip(rank):
    x, y = batch()
    model = _fsdp_model()
    assert type(next(model.parameters())).__name__ == "DTensor"
    opt = ftorch.SGD(model.parameters(), lr=0.1, momentum=0.9, global_clipnorm=CLIP)
    train(model, opt, shard(x, rank), shard(y, rank))
    local_shapes = [tuple(p.to_local().shape) for p in model.parameters()]
    buf_type = type(opt.state[next(model.parameters())]["momentum_buffer"]).__name__
    return {"params": full(model), "local_shapes": local_shapes, "buffer_type": buf_type}


def scenario_fsdp_skip(rank):
    x, y = batch()
    model = _fsdp_model()
    opt = ftorch.SGD(model.parameters(), lr=0.1, momentum=0.9, skip_nonfinite=True, global_clipnorm=CLIP)
    train(model, opt, shard(x, rank), shard(y, rank), steps=1)
    before = full(model)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(shard(x, rank)), shard(y, rank)).backward()
    if rank == 1:  # only rank 1's shard overflows: both ranks must skip
        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    return {"before": before, "after": full(model), "skipped": opt.skipped_steps}


def scenario_dcp(rank, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    x, y = batch()
    xs, ys = shard(x, rank), shard(y, rank)
    model = _fsdp_model()
    opt = ftorch.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, xs, ys, steps=2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    train(model, opt, xs, ys, steps=4, start=2)

    torch.manual_seed(99)
    restored = _fsdp_model()
    with torch.no_grad():
        for p in restored.parameters():
            p.mul_(0.0)
    opt2 = ftorch.SGD(restored.parameters(), lr=0.1, momentum=0.9)
    msd2, osd2 = get_state_dict(restored, opt2)
    sd = {"model": msd2, "optim": osd2}
    dcp.load(sd, checkpoint_id=ckpt_dir)
    set_state_dict(restored, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(restored, opt2, xs, ys, steps=4, start=2)
    return {"straight": full(model), "restored": full(restored)}


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import fastsgd

    fastsgd.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            init_method=f"tcp://127.0.0.1:{port}")
    results = {}
    scenarios = {"ddp": scenario_ddp, "zero": scenario_zero, "fsdp_clip": scenario_fsdp_clip,
                 "fsdp_skip": scenario_fsdp_skip,
                 "dcp": lambda r: scenario_dcp(r, os.path.join(out_dir, "ckpt"))}
    try:
        for name, fn in scenarios.items():
            try:
                results[name] = fn(rank)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active
    # exception") once the peer has gone; the results are on disk, so leave without it.
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp

    # Spawned children import this module by name, with the parent's sys.path: give it the
    # folder above tests/ even when pytest runs from elsewhere (CI tests the installed wheel
    # from outside the checkout, with --import-mode=importlib).
    root = str(Path(__file__).resolve().parents[1])
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            yield from _run_ranks(mp, out_dir)
    finally:
        if added:
            sys.path.remove(root)


def _run_ranks(mp, out_dir):
    """Runs the 2 ranks, bounded in time; yields what each wrote."""
    ctx = mp.start_processes(worker, args=(free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process run did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    yield [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def result(ranks, name):
    for r in ranks:
        assert "error" not in r[name], r[name].get("error")
    return [r[name] for r in ranks]


def single_process(**kwargs):
    x, y = batch()
    model = make_model()
    opt = ftorch.SGD(model.parameters(), **kwargs)
    train(model, opt, x, y)
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a, b):
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_ddp_trains_like_one_process(ranks):
    r0, r1 = result(ranks, "ddp")
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)
    assert_params_close(r0["params"], single_process(lr=0.1, momentum=0.9, nesterov=True))


def test_zero1_matches_zero1_with_torch_sgd(ranks):
    r0, r1 = result(ranks, "zero")
    for r in (r0, r1):
        for p, q in zip(r["ours"], r["torch"]):
            assert torch.equal(p, q)
    assert len(r0["ours_buffers"]) == len(r0["torch_buffers"]) == 4
    for a, b in zip(r0["ours_buffers"], r0["torch_buffers"]):
        assert torch.equal(a, b)
    for p, q in zip(r0["ours_resumed"], r1["ours_resumed"]):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(r0["ours_resumed"], r0["ours"]))


def test_fsdp2_global_clipnorm_equals_single_process(ranks):
    r0, r1 = result(ranks, "fsdp_clip")
    assert r0["buffer_type"] == "DTensor"
    assert r0["local_shapes"][0] == (8, 8) and r1["local_shapes"][0] == (8, 8)  # (16, 8) split in two
    clipped = single_process(lr=0.1, momentum=0.9, global_clipnorm=CLIP)
    assert_params_close(r0["params"], clipped)
    assert_params_close(r1["params"], clipped)
    # The clip was active: without it (or with a per-rank norm) the weights differ.
    unclipped = single_process(lr=0.1, momentum=0.9)
    assert max((p - q).abs().max().item() for p, q in zip(clipped, unclipped)) > 1e-3


def test_fsdp2_nonfinite_on_one_rank_skips_on_both(ranks):
    for r in result(ranks, "fsdp_skip"):
        assert r["skipped"] == 1
        for p, q in zip(r["before"], r["after"]):
            assert torch.equal(p, q)


def test_fsdp2_dcp_checkpoint_resumes_exactly(ranks):
    for r in result(ranks, "dcp"):
        for p, q in zip(r["straight"], r["restored"]):
            assert torch.equal(p, q)
