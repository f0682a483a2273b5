"""bnorm_ext.SyncBatchNorm: parity with single-process BatchNorm on the
concatenated batch, over real process groups.

The distributed checks run in worker processes that this file starts itself
(``python tests/test_sync_batchnorm.py --worker SUITE RANK WORLD STORE OUT``),
a gloo group on a FileStore (NCCL when two GPUs are present). Each suite
groups many cases into one launch; a module-scoped fixture launches it once
and the tests read its per-case figures. Hangs cannot outlive the test: every
collective has a 60 s timeout and the launcher kills every worker and fails
once a worker fails or the whole launch exceeds its deadline.
"""

import contextlib
import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import bnorm_ext
import bnorm_ext.sync_batchnorm as sbn_module
from bnorm_ext import SyncBatchNorm
from bnorm_ext.sync_batchnorm import SyncBatchNormFunction

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from common_utils import (  # noqa: E402
    SEED,
    assert_matches,
    assert_same_strides,
    max_abs_err,
    randn_shifted,
    randomize_bn_,
    requires_torch_bn_bias_arg,
    run_train_step,
)

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
LAUNCH_DEADLINE_S = 150.0
NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


# ===========================================================================
# launcher (parent side)
# ===========================================================================
def _launch(suite, world_size, workdir, backend="gloo", deadline_s=LAUNCH_DEADLINE_S):
    """Runs `suite` on `world_size` fresh worker processes; returns each rank's
    result dict. Fails (after killing every worker) on the first worker error
    or when the deadline passes."""
    os.makedirs(workdir, exist_ok=True)
    store = os.path.join(workdir, "store")
    if os.path.exists(store):
        os.remove(store)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a crashing worker leaves its stack in its log
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # peer links on the loopback only
    procs, logs, outs = [], [], []
    try:
        for rank in range(world_size):
            out = os.path.join(workdir, f"rank{rank}.json")
            log = open(os.path.join(workdir, f"rank{rank}.log"), "w+")
            outs.append(out)
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--worker",
                        suite,
                        str(rank),
                        str(world_size),
                        store,
                        out,
                        backend,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=_HERE,
                )
            )
        start = time.monotonic()
        failed = None
        while True:
            codes = [p.poll() for p in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = f"rank {bad[0]} exited with code {codes[bad[0]]}"
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() - start > deadline_s:
                failed = f"timed out after {deadline_s:.0f} s (exit codes {codes})"
                break
            time.sleep(0.05)
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait(timeout=30)
            report = []
            for rank, log in enumerate(logs):
                log.seek(0)
                report.append(f"----- rank {rank} (exit {procs[rank].returncode}) -----\n{log.read()[-6000:]}")
            pytest.fail(f"{suite} on {world_size} processes: {failed}\n" + "\n".join(report), pytrace=False)
        results = []
        for out in outs:
            with open(out) as f:
                results.append(json.load(f))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()


def _print_figures(title, results):
    print(f"\n{title}")
    for rank, res in enumerate(results):
        for case, figs in res.items():
            if isinstance(figs, dict):
                text = ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in figs.items())
                print(f"  rank {rank} {case}: {text}")


# ===========================================================================
# worker-side helpers
# ===========================================================================
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "broadcast",
    "barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "all_gather_object",
    "broadcast_object_list",
)


@contextlib.contextmanager
def _count_collectives():
    """Counts torch.distributed collectives called while active."""
    counter = {"n": 0, "names": []}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counter["n"] += 1
            counter["names"].append(name)
            return fn(*args, **kwargs)

        return counted

    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
    saved_flat = sbn_module._all_gather_flat
    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    sbn_module._all_gather_flat = wrap("_all_gather_flat", saved_flat)
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        sbn_module._all_gather_flat = saved_flat


@contextlib.contextmanager
def _no_host_reads():
    """Makes every Python-level read of a tensor value on the host raise."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbid(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor value (Tensor.{name}) in the forward")

        return f

    for name in names:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _torch_cls(ndim):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def _tol(dtype):
    # relative tolerance of a result stored in `dtype`, vs a float64 reference
    return {torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-4)


def _parity_case(
    rank,
    sizes,
    dtype,
    tail=(5, 4),
    C=3,
    memory_format=torch.contiguous_format,
    steps=2,
    group=None,
    group_ranks=None,
    param_dtype=None,
    device="cpu",
    seed=0,
    **bn_kw,
):
    """Trains `steps` steps of bnorm_ext.SyncBatchNorm on this rank's slice of a
    global batch and compares with torch's single-process BatchNorm (in
    `dtype`, and in float64) on the whole batch; then one eval step.
    sizes[r] is rank r's batch size; group_ranks the ranks of `group`, in
    order (default: the world). Returns the worst errors seen."""
    group_ranks = list(group_ranks if group_ranks is not None else range(len(sizes)))
    pos = group_ranks.index(rank)
    sizes_in_group = [sizes[r] for r in group_ranks]
    B = sum(sizes_in_group)
    off = sum(sizes_in_group[:pos])
    n = sizes_in_group[pos]
    sl = slice(off, off + n)
    local_size = n
    for d in tail:
        local_size *= d
    group_size = len(group_ranks)
    param_dtype = param_dtype or dtype
    mixed = param_dtype != dtype
    shape = (B, C) + tuple(tail)
    dims = [0] + list(range(2, len(shape)))

    torch.manual_seed(SEED + seed)
    tmod = _torch_cls(len(shape))(C, **bn_kw)
    randomize_bn_(tmod)
    omod = SyncBatchNorm(C, process_group=group, **bn_kw)
    omod.load_state_dict(tmod.state_dict())
    tmod = tmod.to(device=device, dtype=param_dtype)
    omod = omod.to(device=device, dtype=param_dtype)
    ref = copy.deepcopy(tmod).to(device="cpu", dtype=torch.float64)
    affine = bn_kw.get("affine", True)
    track = bn_kw.get("track_running_stats", True)

    figs = {}

    def note(name, ours, theirs, reference):
        e_t = max_abs_err(ours, theirs) if ours.numel() else 0.0
        e_r = max_abs_err(ours, reference) if ours.numel() else 0.0
        figs[f"{name}_vs_torch"] = max(figs.get(f"{name}_vs_torch", 0.0), e_t)
        figs[f"{name}_vs_f64"] = max(figs.get(f"{name}_vs_f64", 0.0), e_r)

    gen = torch.Generator().manual_seed(1000 + seed)
    for step in range(steps):
        tag = f"step {step}"
        x = randn_shifted(shape, dtype, device, memory_format=memory_format, generator=gen)
        dy = torch.randn(shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)
        x_loc = x[sl].clone(memory_format=torch.preserve_format)
        dy_loc = dy[sl].clone()

        # ours, on this rank's slice: one collective each way, no host read
        xin = x_loc.detach().requires_grad_(True)
        with _count_collectives() as fwd:
            with _no_host_reads() if local_size >= 2 else contextlib.nullcontext():
                out_o = omod(xin)
        params = [xin] + ([omod.weight, omod.bias] if affine else [])
        with _count_collectives() as bwd:
            grads = torch.autograd.grad(out_o, params, dy_loc)
        expected = 1 if group_size > 1 else 0
        assert fwd["n"] == expected, f"{tag}: forward collectives {fwd['names']}"
        assert bwd["n"] == expected, f"{tag}: backward collectives {bwd['names']}"

        out_t, gx_t, gw_t, gb_t = run_train_step(tmod, x, dy)
        out_r, gx_r, gw_r, gb_r = run_train_step(ref, x.detach().cpu().double(), dy.cpu().double())

        assert_matches(out_o, out_t[sl], out_r[sl], dtype, f"{tag} output")
        note("out", out_o, out_t[sl], out_r[sl])
        if n > 0:
            assert_same_strides(out_o, out_t[sl].clone(memory_format=torch.preserve_format), f"{tag} output")
        assert_matches(grads[0], gx_t[sl], gx_r[sl], dtype, f"{tag} grad_input")
        note("grad_input", grads[0], gx_t[sl], gx_r[sl])
        if affine:
            gw_loc, gb_loc = grads[1], grads[2]
            # local contributions, as torch.nn.SyncBatchNorm returns them
            x64 = x.detach().cpu().double()
            mu = x64.mean(dims, keepdim=True)
            var = x64.var(dims, unbiased=False, keepdim=True)
            xhat = (x64 - mu) / torch.sqrt(var + omod.eps)
            dy64 = dy.cpu().double()
            gw_loc_ref = (dy64 * xhat)[sl].sum(dims)
            gb_loc_ref = dy64[sl].sum(dims)
            for name, got, want in (("grad_weight_local", gw_loc, gw_loc_ref), ("grad_bias_local", gb_loc, gb_loc_ref)):
                err = max_abs_err(got, want)
                figs[name] = max(figs.get(name, 0.0), err)
                assert got.dtype == param_dtype, f"{tag} {name}: dtype {got.dtype}"
                assert err <= _tol(param_dtype) * max(1.0, want.abs().max().item()), f"{tag} {name}: error {err:.3e}"
            # summed over the group (what DistributedDataParallel then averages)
            gw_sum, gb_sum = gw_loc.clone(), gb_loc.clone()
            dist.all_reduce(gw_sum, group=group)
            dist.all_reduce(gb_sum, group=group)
            assert_matches(gw_sum, gw_t, gw_r, param_dtype, f"{tag} grad_weight", relative_to_torch=mixed)
            assert_matches(gb_sum, gb_t, gb_r, param_dtype, f"{tag} grad_bias", relative_to_torch=mixed)
            note("grad_weight", gw_sum, gw_t, gw_r)
            note("grad_bias", gb_sum, gb_t, gb_r)
        if track:
            for name in ("running_mean", "running_var"):
                o, t, r = getattr(omod, name), getattr(tmod, name), getattr(ref, name)
                assert_matches(o, t, r, param_dtype, f"{tag} {name}", relative_to_torch=mixed)
                note(name, o, t, r)
            assert torch.equal(omod.num_batches_tracked, tmod.num_batches_tracked), f"{tag} num_batches_tracked"
        else:
            assert omod.running_mean is None and omod.num_batches_tracked is None

    # eval: no synchronisation, the single-process path on the local batch
    if n >= 2 or track:
        omod.eval(), tmod.eval(), ref.eval()
        x = randn_shifted(shape, dtype, device, memory_format=memory_format, generator=gen)[sl]
        with torch.no_grad(), _count_collectives() as ev:
            out_o = omod(x)
            out_t = tmod(x)
            out_r = ref(x.cpu().double())
        assert ev["n"] == 0, f"eval collectives {ev['names']}"
        assert_matches(out_o, out_t, out_r, dtype, "eval output")
        note("eval_out", out_o, out_t, out_r)
    figs["local_n"] = n
    return figs


# --- gradcheck of the function across processes --------------------------------
class _LocalRows(torch.autograd.Function):
    """x_all -> this rank's rows; backward assembles every rank's rows."""

    @staticmethod
    def forward(ctx, x_all, off, n, group):
        ctx.off, ctx.n, ctx.group, ctx.shape = off, n, group, x_all.shape
        return x_all[off : off + n].clone()

    @staticmethod
    def backward(ctx, g):
        full = g.new_zeros(ctx.shape)
        full[ctx.off : ctx.off + ctx.n] = g
        dist.all_reduce(full, group=ctx.group)
        return full, None, None, None


class _AllRows(torch.autograd.Function):
    """this rank's rows -> every rank's rows; backward takes this rank's."""

    @staticmethod
    def forward(ctx, y, off, B, group):
        ctx.off, ctx.n = off, y.shape[0]
        full = y.new_zeros((B,) + tuple(y.shape[1:]))
        full[off : off + y.shape[0]] = y
        dist.all_reduce(full, group=group)
        return full

    @staticmethod
    def backward(ctx, g):
        return g[ctx.off : ctx.off + ctx.n].clone(), None, None, None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity whose backward sums the gradient over the group (what DDP does)."""

    @staticmethod
    def forward(ctx, p, group):
        ctx.group = group
        return p.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _gradcheck_case(rank, world_size, sizes, C=2, tail=(2,), momentum=0.1, eps=1e-3):
    """Every rank runs the same gradcheck of G(x_all, weight, bias) = the whole
    group's SyncBatchNormFunction output, each rank computing its own rows; the
    Jacobians therefore include every cross-process term."""
    B = sum(sizes)
    off = sum(sizes[:rank])
    n = sizes[rank]
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(77)
    x_all = (torch.randn((B, C) + tuple(tail), dtype=torch.float64, generator=gen) * 3 + 5).requires_grad_(True)
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64, generator=gen)).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, generator=gen).requires_grad_(True)
    running_mean = torch.zeros(C, dtype=torch.float64)
    running_var = torch.ones(C, dtype=torch.float64)

    def G(x_all, w, b):
        x = _LocalRows.apply(x_all, off, n, group)
        y = SyncBatchNormFunction.apply(
            x,
            _SumGradOverGroup.apply(w, group),
            _SumGradOverGroup.apply(b, group),
            running_mean,
            running_var,
            None,
            momentum,
            eps,
            group,
            world_size,
        )
        return _AllRows.apply(y, off, B, group)

    ok = torch.autograd.gradcheck(G, (x_all, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert ok
    # and without weight/bias
    ok = torch.autograd.gradcheck(
        lambda x_all: _AllRows.apply(
            SyncBatchNormFunction.apply(
                _LocalRows.apply(x_all, off, n, group), None, None, None, None, None, momentum, eps, group, world_size
            ),
            off,
            B,
            group,
        ),
        (x_all,),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )
    assert ok
    # not twice differentiable: create_graph=True is refused, never silently wrong
    x = x_all.detach()[off : off + n].clone().requires_grad_(True)
    y = SyncBatchNormFunction.apply(x, None, None, None, None, None, momentum, eps, group, world_size)
    try:
        torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
    except RuntimeError as e:
        assert "double backward" in str(e), e
    else:
        raise AssertionError("create_graph=True through SyncBatchNormFunction did not raise")
    return {"passed": 1}


# --- DDP training steps ----------------------------------------------------------
def _ddp_case(rank, world_size, sizes, dtype, steps=4, lr=0.1, seed=0):
    """Conv -> BN -> ReLU -> Linear trained with SGD: DDP + bnorm_ext.SyncBatchNorm
    on each rank's slice vs. one process with torch's BatchNorm2d on the whole
    batch. Loss: the whole batch's sum / B on one process; on each rank its own
    sum * world / B, so that DDP's gradient average is the whole batch's gradient."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    B = sum(sizes)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    torch.manual_seed(SEED + 100 + seed)
    ref = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).to(dtype)
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
    model = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(model[1]) is SyncBatchNorm
    ddp = DDP(model)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.5)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.5)
    gen = torch.Generator().manual_seed(500 + seed)
    figs = {"loss": 0.0, "params": 0.0, "running_mean": 0.0, "running_var": 0.0}
    tol = _tol(dtype)
    for step in range(steps):
        x = randn_shifted((B, 3, 4, 4), dtype, generator=gen)
        target = torch.randn((B, 3), dtype=torch.float64, generator=gen).to(dtype)

        opt_ref.zero_grad()
        loss_ref = ((ref(x) - target) ** 2).sum() / B
        loss_ref.backward()
        opt_ref.step()

        opt.zero_grad()
        loss = ((ddp(x[sl]) - target[sl]) ** 2).sum() * (world_size / B)
        loss.backward()
        opt.step()

        total = loss.detach().clone()
        dist.all_reduce(total)
        total /= world_size
        scale = max(1.0, abs(loss_ref.item()))
        err = abs(total.item() - loss_ref.item())
        figs["loss"] = max(figs["loss"], err)
        assert err <= tol * scale, f"step {step}: loss {total.item()} vs one process {loss_ref.item()}"
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            err = max_abs_err(p, p_ref)
            figs["params"] = max(figs["params"], err)
            assert err <= tol * max(1.0, p_ref.abs().max().item()), f"step {step}: {name} differs by {err:.3e}"
        for name in ("running_mean", "running_var"):
            err = max_abs_err(getattr(model[1], name), getattr(ref[1], name))
            figs[name] = max(figs[name], err)
            assert err <= tol * max(1.0, getattr(ref[1], name).abs().max().item()), f"step {step}: {name} {err:.3e}"
        assert torch.equal(model[1].num_batches_tracked, ref[1].num_batches_tracked)
    # eval after training: same model
    ddp.eval(), ref.eval()
    with torch.no_grad():
        x = randn_shifted((B, 3, 4, 4), dtype, generator=gen)
        y = ddp(x[sl])  # every rank calls the DDP forward, empty batch or not
        err = max_abs_err(y, ref(x)[sl]) if sizes[rank] else 0.0
    figs["eval_out"] = err
    assert err <= tol * 10
    figs["local_n"] = sizes[rank]
    return figs


def _ddp_plain_batchnorm_case(rank, world_size, steps=3, lr=0.1):
    """DDP over a model with torch's BatchNorm2d vs the same model converted to
    bnorm_ext.BatchNorm2d (per-rank statistics, buffers broadcast from rank 0):
    the same losses, parameters and buffers on every rank, step by step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(SEED + 300)
    ref = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).double()
    ours = bnorm_ext.convert_batchnorm(copy.deepcopy(ref))
    assert type(ours[1]) is bnorm_ext.BatchNorm2d
    ddps = [DDP(ref), DDP(ours)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.5) for m in ddps]
    gen = torch.Generator().manual_seed(700 + rank)
    figs = {"loss": 0.0, "params": 0.0, "buffers": 0.0}
    for step in range(steps):
        x = randn_shifted((4, 3, 4, 4), torch.float64, generator=gen)
        losses = []
        for ddp, opt in zip(ddps, opts):
            opt.zero_grad()
            loss = ddp(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        figs["loss"] = max(figs["loss"], abs(losses[1] - losses[0]))
        for p_ref, p in zip(ref.parameters(), ours.parameters()):
            figs["params"] = max(figs["params"], max_abs_err(p, p_ref))
        for b_ref, b in zip(ref.buffers(), ours.buffers()):
            figs["buffers"] = max(figs["buffers"], max_abs_err(b.double(), b_ref.double()))
        assert max(figs.values()) <= 1e-10, f"step {step}: {figs}"
    figs["local_n"] = 4
    return figs


# --- suites ----------------------------------------------------------------------
def _suite_world2(rank, world_size, device="cpu"):
    assert world_size == 2
    R = {}
    R["f64 sizes(4,4) 2d"] = _parity_case(rank, (4, 4), torch.float64, tail=(5, 4), C=3, seed=1)
    R["f32 sizes(3,5) 2d channels_last momentum=None"] = _parity_case(
        rank, (3, 5), torch.float32, tail=(4, 3), C=4, memory_format=torch.channels_last, momentum=None, seed=2
    )
    R["f64 sizes(2,6) (N,C) affine=False track=False"] = _parity_case(
        rank, (2, 6), torch.float64, tail=(), C=5, affine=False, track_running_stats=False, seed=3
    )
    R["f32 sizes(1,2) 3d"] = _parity_case(rank, (1, 2), torch.float32, tail=(2, 3, 2), C=2, seed=4)
    R["bf16 input f32 params sizes(3,2)"] = _parity_case(
        rank, (3, 2), torch.bfloat16, tail=(3, 3), C=3, param_dtype=torch.float32, seed=5
    )
    R["f16 input f16 params sizes(4,3)"] = _parity_case(rank, (4, 3), torch.float16, tail=(3, 2), C=3, seed=6)
    R["gradcheck f64 sizes(2,3)"] = _gradcheck_case(rank, world_size, (2, 3))
    R["ddp f32 sizes(3,5)"] = _ddp_case(rank, world_size, (3, 5), torch.float32, seed=1)
    R["ddp f64 sizes(4,4)"] = _ddp_case(rank, world_size, (4, 4), torch.float64, seed=2)
    R["ddp converted BatchNorm2d"] = _ddp_plain_batchnorm_case(rank, world_size)
    return R


def _suite_world3(rank, world_size, device="cpu"):
    assert world_size == 3
    R = {}
    R["f64 sizes(3,1,5) 2d channels_last"] = _parity_case(
        rank, (3, 1, 5), torch.float64, tail=(3, 3), C=4, memory_format=torch.channels_last, seed=11
    )
    R["f32 sizes(3,1,5) 2d"] = _parity_case(rank, (3, 1, 5), torch.float32, tail=(3, 3), C=4, seed=12)
    R["f64 sizes(4,0,3) empty rank"] = _parity_case(rank, (4, 0, 3), torch.float64, seed=13)
    R["f32 sizes(0,3,2) empty rank 0 momentum=None"] = _parity_case(
        rank, (0, 3, 2), torch.float32, momentum=None, seed=14
    )
    R["f64 sizes(1,0,4) (N,C): local counts 1 and 0"] = _parity_case(
        rank, (1, 0, 4), torch.float64, tail=(), C=3, seed=15
    )

    # one value per channel in the whole group: every rank raises, buffers untouched
    m = SyncBatchNorm(3).double()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn((1 if rank == 0 else 0, 3), dtype=torch.float64)
    try:
        m(x)
    except ValueError as e:
        assert "more than 1 value per channel" in str(e), e
    else:
        raise AssertionError("global count 1 did not raise")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a call that raised"
    R["global count 1 raises"] = {"passed": 1}

    # a parameter of the wrong dtype raises on every rank before any
    # collective, with the running stats untouched
    m = SyncBatchNorm(3).double()
    m.weight.data = m.weight.data.float()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        m(torch.randn((4, 3, 2), dtype=torch.float64) * 3 + 5)
    except RuntimeError as e:
        assert "weight" in str(e), e
    else:
        raise AssertionError("a float32 weight with a float64 input did not raise")
    for k, v in m.state_dict().items():
        assert torch.equal(v.to(before[k].dtype), before[k]), f"{k} changed by a call that raised"
    R["bad parameter raises"] = {"passed": 1}

    # every rank empty: empty output, running stats kept, num_batches_tracked + 1,
    # as single-process BatchNorm on an empty batch
    m = SyncBatchNorm(3).double()
    randomize_bn_(m)
    single = bnorm_ext.BatchNorm2d(3).double()
    single.load_state_dict(m.state_dict())
    x = torch.randn((0, 3, 2, 2), dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_single = single(x)
    gx, gw, gb = torch.autograd.grad(y, [x, m.weight, m.bias], torch.zeros_like(y))
    assert y.shape == x.shape and gx.shape == x.shape
    assert torch.equal(gw, torch.zeros(3, dtype=torch.float64)) and torch.equal(gb, torch.zeros(3, dtype=torch.float64))
    for k, v in m.state_dict().items():
        assert torch.equal(v, single.state_dict()[k]), k
    assert y_single.shape == y.shape
    R["all ranks empty"] = {"passed": 1}

    # process_group: ranks {0, 2} synchronise with each other, rank 1 alone
    g02 = dist.new_group([0, 2], timeout=COLLECTIVE_TIMEOUT)
    g1 = dist.new_group([1], timeout=COLLECTIVE_TIMEOUT)
    sizes = (3, 4, 2)
    if rank in (0, 2):
        R["process_group {0,2}"] = _parity_case(rank, sizes, torch.float64, group=g02, group_ranks=[0, 2], seed=16)
    else:
        R["process_group {1} (single-process path)"] = _parity_case(
            rank, sizes, torch.float64, group=g1, group_ranks=[1], seed=17
        )
    dist.barrier()

    R["ddp f64 sizes(4,0,3) empty rank"] = _ddp_case(rank, world_size, (4, 0, 3), torch.float64, seed=3)
    R["ddp f32 sizes(2,5,1)"] = _ddp_case(rank, world_size, (2, 5, 1), torch.float32, seed=4)
    return R


def _suite_nccl(rank, world_size, device="cpu"):
    assert world_size == 2
    torch.cuda.set_device(rank)
    dev = f"cuda:{rank}"
    R = {}
    R["cuda f32 sizes(3,5)"] = _parity_case(rank, (3, 5), torch.float32, device=dev, seed=21)
    R["cuda f64 sizes(4,0) empty rank"] = _parity_case(rank, (4, 0), torch.float64, device=dev, seed=22)
    R["cuda f32 sizes(3,5) channels_last"] = _parity_case(
        rank, (3, 5), torch.float32, device=dev, memory_format=torch.channels_last, seed=23
    )

    # no device-to-host synchronisation in the forward
    m = SyncBatchNorm(4).to(dev)
    x = torch.randn(6, 4, 5, 5, device=dev) * 3 + 5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # the forward can be captured in a CUDA graph (collectives included)
    m = SyncBatchNorm(4).to(dev)
    eager = copy.deepcopy(m)
    static_x = torch.randn(6 + rank, 4, 5, 5, device=dev) * 3 + 5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            m(static_x)
            eager(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = m(static_x)
    new_x = torch.randn(6 + rank, 4, 5, 5, device=dev) * 2 - 1
    static_x.copy_(new_x)
    graph.replay()
    y = eager(new_x)
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, y)
    torch.testing.assert_close(m.running_mean, eager.running_mean)
    torch.testing.assert_close(m.running_var, eager.running_var)
    R["cuda graph capture"] = {"out": max_abs_err(static_y, y)}
    return R


SUITES = {"world2": _suite_world2, "world3": _suite_world3, "nccl": _suite_nccl}


def _worker_main(argv):
    suite, rank, world_size, store, out, backend = argv
    rank, world_size = int(rank), int(world_size)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        results = SUITES[suite](rank, world_size)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # at once: peers blocked in a collective are killed by the launcher
    with open(out + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(out + ".tmp", out)
    dist.destroy_process_group()
    # NB: skip interpreter teardown: a gloo thread still joinable there aborts
    # the process now and then ("terminate called without an active
    # exception", exit -6) after the results are written.
    sys.stdout.flush()
    os._exit(0)


# ===========================================================================
# distributed tests (gloo on CPU)
# ===========================================================================
@pytest.fixture(scope="module")
def world2():
    with tempfile.TemporaryDirectory(prefix="bnorm_syncbn_") as d:
        results = _launch("world2", 2, d)
    _print_figures("world 2 (gloo), max abs errors", results)
    return results


@pytest.fixture(scope="module")
def world3():
    with tempfile.TemporaryDirectory(prefix="bnorm_syncbn_") as d:
        results = _launch("world3", 3, d)
    _print_figures("world 3 (gloo), max abs errors", results)
    return results


def _cases(results, prefix):
    found = [
        (rank, case, figs) for rank, res in enumerate(results) for case, figs in res.items() if case.startswith(prefix)
    ]
    assert found, f"no case {prefix!r} ran"
    return found


# Each worker asserted its cases (collectives counted, parity with torch on the
# concatenated batch); these tests say which ones ran on every rank.
@pytest.mark.parametrize(
    "case",
    [
        "f64 sizes(4,4) 2d",
        "f32 sizes(3,5) 2d channels_last momentum=None",
        "f64 sizes(2,6) (N,C) affine=False track=False",
        "f32 sizes(1,2) 3d",
        "bf16 input f32 params sizes(3,2)",
        "f16 input f16 params sizes(4,3)",
    ],
)
def test_world2_parity(world2, case):
    found = _cases(world2, case)
    assert len(found) == 2
    assert sorted(f["local_n"] for _, _, f in found) == sorted(
        int(s) for s in case.split("sizes(")[1].split(")")[0].split(",")
    )


def test_world2_gradcheck(world2):
    assert len(_cases(world2, "gradcheck f64")) == 2


@pytest.mark.parametrize("case", ["ddp f32 sizes(3,5)", "ddp f64 sizes(4,4)"])
def test_world2_ddp_training(world2, case):
    found = _cases(world2, case)
    assert len(found) == 2
    for _, _, figs in found:
        assert figs["loss"] <= (1e-10 if "f64" in case else 1e-4)


def test_world2_ddp_with_converted_batchnorm(world2):
    found = _cases(world2, "ddp converted BatchNorm2d")
    assert len(found) == 2
    for _, _, figs in found:
        assert max(figs["loss"], figs["params"], figs["buffers"]) <= 1e-10


@pytest.mark.parametrize(
    "case",
    [
        "f64 sizes(3,1,5) 2d channels_last",
        "f32 sizes(3,1,5) 2d",
        "f64 sizes(4,0,3) empty rank",
        "f32 sizes(0,3,2) empty rank 0 momentum=None",
        "f64 sizes(1,0,4) (N,C): local counts 1 and 0",
    ],
)
def test_world3_parity(world3, case):
    found = _cases(world3, case)
    assert len(found) == 3


def test_world3_degenerate_batches(world3):
    assert len(_cases(world3, "global count 1 raises")) == 3
    assert len(_cases(world3, "bad parameter raises")) == 3
    assert len(_cases(world3, "all ranks empty")) == 3


def test_world3_process_group(world3):
    assert len(_cases(world3, "process_group {0,2}")) == 2
    assert len(_cases(world3, "process_group {1}")) == 1


@pytest.mark.parametrize("case", ["ddp f64 sizes(4,0,3) empty rank", "ddp f32 sizes(2,5,1)"])
def test_world3_ddp_training(world3, case):
    assert len(_cases(world3, case)) == 3


@pytest.mark.skipif(NUM_GPUS < 2, reason="NCCL tests need >= 2 GPUs")
@pytest.mark.skipif(not bnorm_ext.build_info().get("cuda_compiled", False), reason="bnorm_ext built without CUDA")
def test_nccl():
    with tempfile.TemporaryDirectory(prefix="bnorm_syncbn_") as d:
        results = _launch("nccl", 2, d, backend="nccl")
    _print_figures("world 2 (nccl), max abs errors", results)
    assert all("cuda graph capture" in r for r in results)


# ===========================================================================
# single-process tests (no process group)
# ===========================================================================
@requires_torch_bn_bias_arg
def test_module_matches_torch_syncbatchnorm():
    import inspect

    torch.manual_seed(0)
    ours = SyncBatchNorm(5, eps=1e-3, momentum=None, affine=True, track_running_stats=True, bias=False)
    theirs = nn.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=True, track_running_stats=True, bias=False)
    # a sibling of torch's class, not a subclass: DDP refuses CPU models holding
    # a torch.nn.SyncBatchNorm
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm) and not isinstance(ours, nn.SyncBatchNorm)
    assert inspect.signature(SyncBatchNorm.__init__) == inspect.signature(nn.SyncBatchNorm.__init__)
    assert repr(ours) == repr(theirs)
    assert vars(ours).keys() == vars(theirs).keys()
    for k, v in vars(theirs).items():
        if not k.startswith("_"):
            assert getattr(ours, k) == v, k
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k
    marker = object()
    assert SyncBatchNorm(3, 1e-5, 0.1, True, True, marker).process_group is marker
    assert SyncBatchNorm(3, process_group=marker).process_group is marker
    m = SyncBatchNorm(3, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    with pytest.raises(ValueError, match="at least 2D"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="non-zero"):
        SyncBatchNorm(0)(torch.randn(2, 0))
    assert "SyncBatchNorm" in bnorm_ext.__all__ and bnorm_ext.SyncBatchNorm is SyncBatchNorm


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "momNone"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (6, 4), (2, 3, 2, 3, 4)], ids=["2d", "NC", "3d"])
def test_single_process_parity(shape, dtype, momentum):
    """No process group: the single-process path, equal to torch's SyncBatchNorm
    (which then falls back to F.batch_norm): train steps, then eval."""
    assert not (dist.is_available() and dist.is_initialized())
    C = shape[1]
    tmod = randomize_bn_(nn.SyncBatchNorm(C, momentum=momentum)).to(dtype)
    omod = SyncBatchNorm(C, momentum=momentum).to(dtype)
    omod.load_state_dict(tmod.state_dict())
    ref = copy.deepcopy(tmod).double()
    for step in range(3):
        if step == 2:
            tmod.eval(), omod.eval(), ref.eval()
        x = randn_shifted(shape, dtype)
        dy = torch.randn(shape, dtype=torch.float64).to(dtype)
        got = run_train_step(omod, x, dy)
        want = run_train_step(tmod, x, dy)
        exact = run_train_step(ref, x.double(), dy.double())
        for name, o, t, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want, exact):
            assert_matches(o, t, r, dtype, f"step {step} {name}")
        for name in ("running_mean", "running_var"):
            assert_matches(getattr(omod, name), getattr(tmod, name), getattr(ref, name), dtype, f"step {step} {name}")
        assert torch.equal(omod.num_batches_tracked, tmod.num_batches_tracked)


@requires_torch_bn_bias_arg
def test_convert_sync_batchnorm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = nn.BatchNorm1d(3)
            self.inner = nn.Sequential(nn.Conv2d(3, 4, 1), bnorm_ext.BatchNorm2d(4, momentum=None, eps=1e-3))
            self.bn3 = nn.BatchNorm3d(2, affine=False)
            self.nobias = nn.BatchNorm2d(5, bias=False)
            self.notrack = bnorm_ext.BatchNorm1d(2, track_running_stats=False)
            self.tsync = nn.SyncBatchNorm(6)
            self.other = nn.LayerNorm(4)

    net = Net().double()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None:
            randomize_bn_(m)
    net.inner.eval()
    net.bn1.qconfig = "qconfig-marker"
    before = {name: m for name, m in net.named_modules()}
    torch_converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    group = object()
    out = SyncBatchNorm.convert_sync_batchnorm(net, process_group=group)
    assert out is net
    names = ["bn1", "inner.1", "bn3", "nobias", "notrack", "tsync"]
    for name in names:
        old, new = before[name], out.get_submodule(name)
        assert type(new) is SyncBatchNorm, name
        assert new.process_group is group
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(old, attr), (name, attr)
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(new, attr) is getattr(old, attr), (name, attr)  # shared, not copied
        assert repr(new) == repr(torch_converted.get_submodule(name))
    assert out.bn1.qconfig == "qconfig-marker"
    assert type(out.other) is nn.LayerNorm and type(out.inner[0]) is nn.Conv2d
    assert out.nobias.bias is None and out.bn3.weight is None
    assert out.state_dict().keys() == torch_converted.state_dict().keys()
    for k, v in torch_converted.state_dict().items():
        assert torch.equal(out.state_dict()[k], v), k
    # a BatchNorm module itself: a new module is returned
    bn = nn.BatchNorm2d(3)
    new = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(new) is SyncBatchNorm and new is not bn and new.weight is bn.weight
    assert new.process_group is None
    # no process group: trains like BatchNorm
    x = randn_shifted((4, 3, 2, 2), torch.float32)
    ref = copy.deepcopy(bn)
    torch.testing.assert_close(new(x), ref(x))
    torch.testing.assert_close(new.running_var, ref.running_var)


def test_raises_count_one_single_process():
    m = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3))
    assert m.num_batches_tracked.item() == 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2:])
