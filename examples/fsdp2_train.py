"""Train a Llama-style model with FSDP2 and Adam-mini; checkpoint and resume with DCP.

    torchrun --nproc_per_node 2 examples/fsdp2_train.py --steps 20 --checkpoint ckpt
    torchrun --nproc_per_node 3 examples/fsdp2_train.py --steps 40 --checkpoint ckpt   # resumes at step 20

Runs on CPUs (gloo) or GPUs (nccl, one per rank). A checkpoint written at one world size loads at
another. The data here is random tokens: put your own loader where ``batch`` is built.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import blockopt
from blockopt.bench.models import Llama, LlamaConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint", type=Path, help="folder to save to, and to resume from if it exists")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same initial weights on every rank
    model = Llama(LlamaConfig(vocab_size=1000, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64)).to(device)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # Blocks come from the model's structure (heads, GQA, embeddings, norms) as without FSDP;
    # blocks cut by the sharding are summed across ranks with one all-reduce per step.
    optimizer = blockopt.AdamMini(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    start = 0
    if args.checkpoint is not None and (args.checkpoint / ".metadata").exists():
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=str(args.checkpoint))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start} on {world} ranks")

    data = torch.Generator().manual_seed(1234)
    for step in range(args.steps):
        batch = torch.randint(0, 1000, (4 * world, 65), generator=data)  # the global batch
        if step < start:
            continue  # keep the data order of an uninterrupted run
        mine = batch.chunk(world)[rank].to(device)
        _, loss = model(mine[:, :-1], mine[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (step + 1) % 5 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}")

    if args.checkpoint is not None:
        model_state, optim_state = get_state_dict(model, optimizer)  # collective: every rank calls it
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(args.steps)}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(args.checkpoint), overwrite=True))
        if rank == 0:
            print(f"saved {args.checkpoint} at step {args.steps}")
    # Leave together: a rank that tears down gloo while a peer is still finishing the save's
    # last collective can abort that peer (seen once, at 3 ranks on a loaded 2-core machine).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
