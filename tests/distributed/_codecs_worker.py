"""What each rank runs in the compressed-momentum distributed tests (spawned by
``test_fsdp_codecs.py`` through ``conftest.run_world``).

One tiny float64 model whose tensors hit every case of Note [compressed momentum of sharded
parameters]: a matrix with uneven row shards and rows of two chunks (one short, and an odd width
for int4's bytes), a vector of three chunks whose shard boundaries fall inside chunks, and tensors
smaller than the world (ranks with empty shards). Rank ``r`` of ``w`` takes rows
``r*B/w .. (r+1)*B/w`` of a fixed global batch, so FSDP's averaged gradient is the one-process
gradient of the whole batch; the bf16 runs of ``param_rounding="stochastic"`` set the same
gradients directly at every world size (`exact_gradients`). Results (full parameters, full
momentum state) go to ``out/<name>.rank<r>.pt``.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn as nn

import blockopt
from blockopt.distributed import AllReduceCounter, is_dtensor, shard_like

from . import _worker

GLOBAL_BATCH = 6
WIDTH = 301
STEPS = 6
SPLIT = 3  # checkpoint after this many steps, resume for the rest
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# blocks cut by the row shards (w's columns, v whole) and blocks that are not (t's rows, u)
RULES = {"w": "cols", "v": "whole", "u": "coordinate", "t": "rows"}


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(5, WIDTH, generator=g, dtype=torch.float64) * 0.1)  # 5 rows: uneven shards
        self.v = nn.Parameter(torch.randn(600, generator=g, dtype=torch.float64) * 0.1)  # chunks 256, 256, 88
        self.u = nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64))  # 1-D, smaller than the world
        self.t = nn.Parameter(torch.randn(1, 3, generator=g, dtype=torch.float64))  # one row: empty shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.w.T)
        k = torch.tanh(x[:, :300] @ self.v.view(2, 300).T)
        return ((h.sum(-1) + k.sum(-1) * self.u + (self.t * x[:, :3]).sum(-1)) ** 2).mean()


def optimizer(model: nn.Module, momentum_dtype: str) -> blockopt.AdamMini:
    return blockopt.AdamMini(model, **HYPER, rules=RULES, momentum_dtype=momentum_dtype)


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, WIDTH, generator=g, dtype=torch.float64) for _ in range(steps)]


def local_rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per]


def train(model, opt, data, rank: int, world: int) -> None:
    for x in data:
        opt.zero_grad(set_to_none=True)
        model(local_rows(x, rank, world)).backward()
        opt.step()


def whole(t):
    """A tensor as one process holds it (collective for DTensors: every rank calls it alike)."""

    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(model: nn.Module, opt) -> dict:
    """Full parameters and every parameter's full momentum state, by name."""
    params = {n: whole(p).detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: whole(v).clone() for k, v in opt.state[p].items() if k != "exp_avg_sq"} for n, p in model.named_parameters()}
    return {"params": params, "state": state}


def fsdp(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (world,)))


def checkpoint(out: Path, momentum_dtype: str, world: int) -> str:
    return str(out / f"ckpt_{momentum_dtype}_w{world}")


# ---- scenarios ----------------------------------------------------------------------------
def scenario_train(rank, world, out: Path, momentum_dtype: str) -> None:
    """The whole run under FSDP, and a DCP checkpoint at ``SPLIT`` (with the state it holds)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = fsdp(Odd(), world)
    opt = optimizer(model, momentum_dtype)
    data = batches()
    train(model, opt, data[:SPLIT], rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint(out, momentum_dtype, world))
    at_split = snapshot(model, opt)
    train(model, opt, data[SPLIT:-1], rank, world)
    opt.zero_grad(set_to_none=True)
    model(local_rows(data[-1], rank, world)).backward()
    with AllReduceCounter() as sent:  # the last step's collectives
        opt.step()
    result = {"split": at_split, "end": snapshot(model, opt), "all_reduce_calls": sent.calls}
    torch.save(result, out / f"train_{momentum_dtype}_w{world}.rank{rank}.pt")


def scenario_compiled(rank, world, out: Path, momentum_dtype: str) -> None:
    """The whole run under FSDP with ``torch.compile(opt.step)`` (Note [a compiled step of sharded
    parameters]: it runs the eager step)."""
    model = fsdp(Odd(), world)
    opt = optimizer(model, momentum_dtype)
    step = torch.compile(opt.step)
    for x in batches():
        opt.zero_grad(set_to_none=True)
        model(local_rows(x, rank, world)).backward()
        step()
    torch.save({"end": snapshot(model, opt)}, out / f"compiled_{momentum_dtype}_w{world}.rank{rank}.pt")


def scenario_unlike(rank, world, out: Path, setting: str) -> None:
    """Every rank builds its optimizer otherwise in ``setting`` (taken from the rank): the first
    step refuses on every rank, having changed nothing."""
    model = fsdp(Odd(), world)
    other = {"momentum_dtype": ("int8", "bfloat16")[rank % 2]} if setting == "momentum_dtype" else {"seed": rank}
    opt = blockopt.AdamMini(model, **HYPER, rules=RULES, **{"momentum_dtype": "int8", **other})
    model(local_rows(batches(1)[0], rank, world)).backward()
    try:
        opt.step()
        refused = None
    except ValueError as error:
        refused = str(error)
    torch.save({"refused": refused, "state": len(opt.state)}, out / f"unlike_{setting}_w{world}.rank{rank}.pt")


def scenario_resume(rank, world, out: Path, momentum_dtype: str, saved_world: int) -> None:
    """Load the checkpoint written at ``saved_world`` ranks (1: one process) into ``world``
    ranks (1 and no process group: one process) and finish the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp(Odd(), world) if dist.is_initialized() else Odd()
    opt = optimizer(model, momentum_dtype)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint(out, momentum_dtype, saved_world))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = snapshot(model, opt)
    train(model, opt, batches()[SPLIT:], rank, world)
    name = f"resume_{momentum_dtype}_w{saved_world}_to_w{world}"
    torch.save({"loaded": loaded, "end": snapshot(model, opt)}, out / f"{name}.rank{rank}.pt")


def scenario_load_whole(rank, world, out: Path, momentum_dtype: str) -> None:
    """Load the one-process ``opt.state_dict()`` saved at ``SPLIT`` (whole tensors, no DCP) into
    ``world`` ranks with ``load_state_dict``, and finish the run."""
    saved = torch.load(out / f"whole_{momentum_dtype}.pt", weights_only=False)
    model = fsdp(Odd(), world)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.to_local().copy_(shard_like(saved["model"][name], p).to_local())
    opt = optimizer(model, momentum_dtype)
    opt.load_state_dict(saved["optim"])
    loaded = snapshot(model, opt)
    train(model, opt, batches()[SPLIT:], rank, world)
    torch.save({"loaded": loaded, "end": snapshot(model, opt)}, out / f"load_whole_{momentum_dtype}_w{world}.rank{rank}.pt")


# ---- param_rounding="stochastic" on bf16 parameters ------------------------------------------
ROUNDING_STEPS = 3


def exact_gradients(steps: int = ROUNDING_STEPS) -> list[dict[str, torch.Tensor]]:
    """Per step, a bf16 gradient for each of `Odd`'s parameters, set directly (no backward), so
    every world size steps the very same gradients. Multiples of 1/64 below 2 in magnitude: their
    squares' block sums are exact in float32 in any order, so the cut blocks' sums summed across
    ranks equal one process's and the float32 update is the same at every world size."""
    g = torch.Generator().manual_seed(2)
    shapes = {n: p.shape for n, p in Odd().named_parameters()}
    return [{n: (torch.randint(-127, 128, shape, generator=g) / 64).bfloat16() for n, shape in shapes.items()}
            for _ in range(steps)]


def rounding_run(model: nn.Module) -> dict[str, torch.Tensor]:
    """``ROUNDING_STEPS`` steps of bf16 `Odd` with stochastic parameter rounding; its full bf16
    parameters. (One implementation at every world size: "auto" would take the C++ kernel in one
    process and the batched step where blocks are cut, which may differ in the update's last bit.)"""
    opt = blockopt.AdamMini(model, **HYPER, rules=RULES, param_rounding="stochastic", implementation="reference")
    for grads in exact_gradients():
        for name, p in model.named_parameters():
            p.grad = shard_like(grads[name], p) if is_dtensor(p) else grads[name].clone()
        opt.step()
    return {n: whole(p).detach().clone() for n, p in model.named_parameters()}


def scenario_stochastic(rank, world, out: Path, local_bits: bool = False) -> None:
    """`rounding_run` under FSDP; ``local_bits``: every shard draws the bits of its local indices
    (what the shard's offset prevents: the test must tell the two apart)."""
    from blockopt.optim import param_rounding

    with mock.patch.object(param_rounding, "_rounding_offset", lambda layout, name: 0) if local_bits else nullcontext():
        params = rounding_run(fsdp(Odd().bfloat16(), world))
    torch.save(params, out / f"stochastic{'_local_bits' if local_bits else ''}_w{world}.rank{rank}.pt")


def scenario_convert(rank, world, out: Path, saved_dtype: str, live_dtype: str, saved_world: int,
                     planner: bool = False) -> None:
    """A DCP checkpoint saved with ``saved_dtype`` at ``saved_world`` ranks, resumed with
    ``live_dtype`` at ``world`` ranks (1 and no process group: one process). ``planner``: DCP loads
    it straight into the live optimizer through `ConvertingLoadPlanner`; otherwise into an
    optimizer with the checkpoint's setting, whose ``state_dict()`` the live optimizer loads (and converts)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp(Odd(), world) if dist.is_initialized() else Odd()
    opt = reader = optimizer(model, live_dtype if planner else saved_dtype)
    model_sd, optim_sd = get_state_dict(model, reader)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint(out, saved_dtype, saved_world),
             planner=blockopt.distributed.ConvertingLoadPlanner() if planner else None)
    set_state_dict(model, reader, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if not planner:
        opt = optimizer(model, live_dtype)
        opt.load_state_dict(reader.state_dict())
    loaded = snapshot(model, opt)
    train(model, opt, batches()[SPLIT:], rank, world)
    name = f"convert_{saved_dtype}_w{saved_world}_to_{live_dtype}_w{world}" + ("_planner" if planner else "")
    torch.save({"loaded": loaded, "end": snapshot(model, opt)}, out / f"{name}.rank{rank}.pt")


SCENARIOS = {"train": scenario_train, "compiled": scenario_compiled, "unlike": scenario_unlike, "resume": scenario_resume, "load_whole": scenario_load_whole,
             "stochastic": scenario_stochastic, "convert": scenario_convert}


def one_process(out: Path, momentum_dtype: str) -> dict:
    """The reference: one process, the whole batch; also writes its checkpoints at ``SPLIT`` (DCP,
    and ``torch.save`` of the state dicts)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = Odd()
    opt = optimizer(model, momentum_dtype)
    data = batches()
    train(model, opt, data[:SPLIT], 0, 1)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint(out, momentum_dtype, 1))
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, out / f"whole_{momentum_dtype}.pt")
    at_split = snapshot(model, opt)
    train(model, opt, data[SPLIT:], 0, 1)
    return {"split": at_split, "end": snapshot(model, opt)}


def main(rank: int, world: int, store: str, out: str, plan: list[tuple[str, dict]]) -> None:
    """Entry point of a spawned rank: run every scenario of ``plan`` in order."""
    _worker.join_gloo(rank, world, store)
    _worker.run_plan(SCENARIOS, rank, world, out, plan)
