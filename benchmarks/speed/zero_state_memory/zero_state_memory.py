"""Per-rank optimizer state under DeepSpeed ZeRO-2: Adam-mini against DeepSpeed with AdamW, side by side.

Each rank of a ``--world``-process gloo run (CPU) builds GPT-2 small (HF GPT2LMHeadModel, 124M,
tied head), wraps it with ``deepspeed.initialize`` (ZeRO stage 2, fp32) once with
``torch.optim.AdamW`` and once with ``blockopt.AdamMini``, takes one step on a tiny batch (which
creates the state) and counts the state its rank holds with ``blockopt.state_bytes`` (the ZeRO
optimizer's ``state``: this rank's partition only). Memory, not timing.

    python benchmarks/speed/zero_state_memory/zero_state_memory.py             # results/default: result.json
    python benchmarks/speed/zero_state_memory/zero_state_memory.py --world 4 --out .../results/world4
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import blockopt
from blockopt.bench import write_result

HERE = Path(__file__).resolve().parent
PEERS = ("adamw", "adam-mini")


def optimizer(name: str, model):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    return blockopt.AdamMini(model, lr=1e-4)


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel

    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    rows = {}
    for name in PEERS:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config())
        n_params = sum(p.numel() for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(name, model), config=config)
        tokens = torch.randint(0, 50257, (1, 9))
        engine.backward(engine(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss)
        engine.step()  # materialises the state
        rows[name] = blockopt.state_bytes(engine.optimizer)
        del engine, model
    torch.save({"rank": rank, "n_params": n_params, **rows}, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="data-parallel ranks (processes on this machine)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default", help="the run's folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        torch.multiprocessing.start_processes(rank_main, args=(args.world, port, tmp), nprocs=args.world, join=True,
                                              start_method="spawn")
        per_rank = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(args.world)]
    n_params = per_rank[0]["n_params"]
    print(f"GPT-2 small ({n_params:,} parameters), ZeRO-2, {args.world} ranks; optimizer state per rank:")
    print(f"{'rank':>4}{'AdamW MB':>12}{'Adam-mini MB':>14}{'ratio':>8}")
    for r in per_rank:
        r["ratio"] = r["adam-mini"] / r["adamw"]
        print(f"{r['rank']:>4}{r['adamw'] / 1e6:>12.1f}{r['adam-mini'] / 1e6:>14.1f}{r['ratio']:>8.4f}")
    one_process_adamw = 2 * 4 * n_params  # float32 m and v of every parameter
    settings = {"model": "gpt2-small (HF GPT2LMHeadModel default config)", "zero_stage": 2, "world": args.world,
                "precision": "fp32", "count": "blockopt.state_bytes(engine.optimizer) after one step"}
    results = {"n_params": n_params, "one_process_adamw_bytes": one_process_adamw, "ranks": per_rank,
               "max_ratio": max(r["ratio"] for r in per_rank)}
    path = write_result(args.out, name="zero_state_memory", settings=settings, results=results,
                        distributions=("deepspeed", "transformers"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
