"""What each rank runs in the distributed tests (spawned by ``conftest.run_world``).

Every scenario trains in float64 on a fixed global batch; rank ``r`` of ``w`` takes rows
``r*B/w .. (r+1)*B/w`` of it, so FSDP's and DDP's averaged gradients equal the one-process
gradient of the whole batch. Results (full parameters, counts) go to ``out/<name>.rank<r>.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import blockopt
from blockopt.bench.models import Llama, LlamaConfig
from blockopt.distributed import AllReduceCounter

GLOBAL_BATCH = 6
SEQ = 7
STEPS = 10
HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

# Heads of 4 rows under 2 ranks split a query head in two; 37 tokens split unevenly; one KV head
# of 4 rows under 3 ranks leaves a rank with an empty shard.
LLAMA = LlamaConfig(vocab_size=37, dim=12, n_layers=2, n_heads=3, n_kv_heads=1, mlp_hidden=20, max_seq_len=SEQ)


def llama() -> nn.Module:
    torch.manual_seed(0)
    return Llama(LLAMA).double()


def gpt2() -> nn.Module:
    """transformers' GPT-2: Conv1D (in, out) weights, fused qkv, tied head, vocab 37."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=37, n_positions=SEQ + 1, n_embd=12, n_layer=2, n_head=3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).double()


MODELS = {"llama": llama, "gpt2": gpt2}

# AdaPM at rank 2: low-rank query/key/MLP factors (the 4-row key under 3 ranks leaves a rank no
# rows of it), full value, no momentum for the embedding, attention output and head.
OPTIMIZERS = {
    "adam-mini": lambda model, implementation="auto": blockopt.AdamMini(model, **HYPER, implementation=implementation),
    "adapm": lambda model, implementation="auto": blockopt.AdaPM(model, **HYPER, rank=2, implementation=implementation),
    # bf16 full momenta and factors: every shard must draw the rounding bits one process draws
    "adapm-bf16m": lambda model, implementation="auto": blockopt.AdaPM(
        model, **HYPER, rank=2, implementation=implementation, momentum_dtype="bfloat16"),
    # (SGD-SaI has one implementation)
    "sgd-sai": lambda model, implementation="auto": blockopt.SGDSaI(model, lr=1e-3, momentum=0.9, weight_decay=0.1),
    "sgd-sai-int8m": lambda model, implementation="auto": blockopt.SGDSaI(
        model, lr=1e-3, momentum=0.9, weight_decay=0.1, momentum_dtype="int8"),
}


def tag(model_name: str, optimizer: str, implementation: str = "auto") -> str:
    """File-name part of a run: AdamMini runs by implementation, others by optimizer."""
    return f"{model_name}_{implementation}" if optimizer == "adam-mini" else f"{model_name}_{optimizer}"


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 37, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def loss_of(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    inner = getattr(model, "module", model)  # DDP wraps
    if isinstance(inner, Llama):
        return model(window[:, :-1], window[:, 1:])[1]
    # transformers' own loss runs in float32; the references here need float64 throughout
    logits = model(input_ids=window[:, :-1]).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())


def local_rows(window: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    return window[rank * per:(rank + 1) * per]


def train(model, optimizer, data, rank: int, world: int) -> None:
    for window in data:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, local_rows(window, rank, world)).backward()
        optimizer.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = p.detach().clone()
    return out


def fsdp(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    blocks = model.layers if isinstance(model, Llama) else model.transformer.h
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---- scenarios --------------------------------------------------------------------------
def scenario_fsdp(rank, world, out: Path, model_name: str, implementation: str = "auto", optimizer: str = "adam-mini") -> None:
    model = fsdp(MODELS[model_name](), world)
    opt = OPTIMIZERS[optimizer](model, implementation)
    data = batches()
    train(model, opt, data[:-1], rank, world)
    # the last step, with the optimizer's collectives counted
    opt.zero_grad(set_to_none=True)
    loss_of(model, local_rows(data[-1], rank, world)).backward()
    with AllReduceCounter() as counter, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    # every collective the backend ran, whichever API issued it (DTensor ops use functional ones)
    collectives = [e.name for e in prof.events() if e.name.startswith("gloo:")]
    result = {
        "params": full_params(model), "all_reduce_calls": counter.calls, "all_reduce_bytes": counter.bytes,
        "collectives": collectives,
    }
    torch.save(result, out / f"fsdp_{tag(model_name, optimizer, implementation)}_w{world}.rank{rank}.pt")


def scenario_ddp(rank, world, out: Path, model_name: str = "llama") -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(MODELS[model_name]())
    opt = blockopt.AdamMini(model.module, **HYPER)
    train(model, opt, batches(), rank, world)
    torch.save({"params": full_params(model)}, out / f"ddp_{model_name}_w{world}.rank{rank}.pt")


def scenario_checkpoint_save(rank, world, out: Path, model_name: str, split: int, optimizer: str = "adam-mini") -> None:
    """Train ``split`` steps under FSDP at this world size, then save model + optimizer with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = fsdp(MODELS[model_name](), world)
    opt = OPTIMIZERS[optimizer](model)
    train(model, opt, batches()[:split], rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / f"ckpt_{tag(model_name, optimizer)}_w{world}"))


def scenario_checkpoint_resume(
    rank, world, out: Path, model_name: str, split: int, saved_world: int, optimizer: str = "adam-mini"
) -> None:
    """Load the checkpoint written at ``saved_world`` ranks into ``world`` ranks and finish the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp(MODELS[model_name](), world) if world > 1 or dist.is_initialized() else MODELS[model_name]()
    opt = OPTIMIZERS[optimizer](model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(out / f"ckpt_{tag(model_name, optimizer)}_w{saved_world}"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, batches()[split:], rank, world)
    name = f"resume_{tag(model_name, optimizer)}_w{saved_world}_to_w{world}"
    torch.save({"params": full_params(model)}, out / f"{name}.rank{rank}.pt")


SCENARIOS = {
    "fsdp": scenario_fsdp,
    "ddp": scenario_ddp,
    "checkpoint_save": scenario_checkpoint_save,
    "checkpoint_resume": scenario_checkpoint_resume,
}


def run_plan(scenarios: dict, rank: int, world: int, out: str, plan: list[tuple[str, dict]]) -> None:
    """Run every scenario of ``plan`` in order (all ranks in step), then leave the process group."""
    try:
        for name, kwargs in plan:
            scenarios[name](rank, world, Path(out), **kwargs)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def join_gloo(rank: int, world: int, store: str) -> None:
    """Join the localhost gloo group through the file ``store``, one thread per rank."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def main(rank: int, world: int, store: str, out: str, plan: list[tuple[str, dict]]) -> None:
    """Entry point of a spawned rank: run every scenario of ``plan`` in order."""
    join_gloo(rank, world, store)
    run_plan(SCENARIOS, rank, world, out, plan)
