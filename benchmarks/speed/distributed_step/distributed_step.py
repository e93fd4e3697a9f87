"""Optimizer step under FSDP2 on CPU ranks (gloo): communication per step and step time.

    python benchmarks/speed/distributed_step/distributed_step.py                 # worlds 2 3 4, both models
    python benchmarks/speed/distributed_step/distributed_step.py --worlds 2 --reps 5

For each world size, the ranks shard one model with ``fully_shard`` per block and at the root,
once per peer (same init, same gradients), then step the peers in turn (barrier, step, barrier),
``--reps`` times, and report each peer's median step time, the ratio to torch's AdamW (the
default foreach implementation for DTensors), and every collective the step ran: counted from
the profiler's backend events (whichever API issued them), with the bytes of ``dist.all_reduce``
calls. Peers that fail under FSDP2 are reported with their error. Writes ``result.json`` and
``distributed_step.png`` into ``--out`` (default: results/fsdp2-cpu).

Note: all ranks share this machine's cores, so times are for comparing peers side by side in one
run, not absolute figures for a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from blockopt.bench import write_result
from blockopt.distributed import AllReduceCounter

HERE = Path(__file__).resolve().parent
BACKEND = "gloo (CPU), one thread per rank"
PEERS = ("adamw", "adam-mini (blockopt)", "adam-mini-official")


def build(model_name: str) -> tuple[torch.nn.Module, dict]:
    """(model, facts for the official package)."""
    torch.manual_seed(0)
    if model_name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=8003, n_positions=128, n_embd=256, n_layer=4, n_head=8,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config), {"dim": 256, "n_heads": 8, "n_kv_heads": 8}
    from blockopt.bench import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=8003, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=128)
    return Llama(config), {"dim": 256, "n_heads": 8, "n_kv_heads": 2}


def blocks_of(model):
    return model.transformer.h if hasattr(model, "transformer") else model.layers


def make_optimizer(name: str, model, facts: dict):
    import blockopt

    settings = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **settings)
    if name == "adam-mini (blockopt)":
        return blockopt.AdamMini(model, **settings)
    import adam_mini

    return adam_mini.Adam_mini(model.named_parameters(), **settings, **facts)


def loss_of(model, window):
    if hasattr(model, "transformer"):
        logits = model(input_ids=window[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
    return model(window[:, :-1], window[:, 1:])[1]


def rank_main(rank: int, world: int, store: str, out: str, models: list[str], reps: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for model_name in models:
        window = torch.randint(0, 8003, (2, 65), generator=torch.Generator().manual_seed(rank))
        peers, report = {}, {}
        for name in PEERS:
            model, facts = build(model_name)
            for block in blocks_of(model):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            try:
                optimizer = make_optimizer(name, model, facts)
                loss_of(model, window).backward()
                optimizer.step()  # allocates state (and builds anything lazy)
                dist.barrier()
                peers[name] = optimizer
            except Exception as error:  # a peer that can't run under FSDP2 is a result too
                report[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
                dist.barrier()
        n_params = sum(p.numel() for p in build(model_name)[0].parameters())
        times = {name: [] for name in peers}
        for _ in range(reps):
            for name, optimizer in peers.items():
                dist.barrier()
                start = time.perf_counter()
                optimizer.step()
                dist.barrier()
                times[name].append(time.perf_counter() - start)
        for name, optimizer in peers.items():
            with AllReduceCounter() as counter, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                optimizer.step()
            collectives: dict[str, int] = {}
            for event in prof.events():
                if event.name.startswith("gloo:"):
                    collectives[event.name] = collectives.get(event.name, 0) + 1
            report[name] = {
                "step_ms_median": 1e3 * statistics.median(times[name]),
                "step_ms_all": [1e3 * t for t in times[name]],
                "collectives_per_step": collectives,
                "collective_calls_per_step": sum(collectives.values()),
                "all_reduce_bytes_per_step": counter.bytes,
            }
        base = report.get("adamw", {}).get("step_ms_median")
        for name in peers:
            if base:
                report[name]["ratio_to_adamw"] = report[name]["step_ms_median"] / base
        results[model_name] = {"n_params": n_params, "peers": report}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fsdp2-cpu", help="the run's folder")
    args = parser.parse_args()

    started = time.perf_counter()
    by_world = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = Path(tmp) / f"w{world}.json"
            torch.multiprocessing.start_processes(
                rank_main, args=(world, str(Path(tmp) / f"store{world}"), str(out), args.models, args.reps),
                nprocs=world, join=True, start_method="spawn",
            )
            by_world[world] = json.loads(out.read_text())

    print(f"{'model':6} {'world':>5}  {'peer':22} {'step ms':>9} {'x AdamW':>8} {'collectives/step':>17} {'all_reduce bytes':>17}")
    for world, models in by_world.items():
        for model_name, result in models.items():
            for name, r in result["peers"].items():
                if "error" in r:
                    print(f"{model_name:6} {world:>5}  {name:22} failed: {r['error'][:70]}")
                    continue
                print(f"{model_name:6} {world:>5}  {name:22} {r['step_ms_median']:9.2f} {r.get('ratio_to_adamw', float('nan')):8.2f} "
                      f"{r['collective_calls_per_step']:17d} {r['all_reduce_bytes_per_step']:17,d}")
    results = {"worlds": {str(w): r for w, r in by_world.items()}, "wall_s": time.perf_counter() - started}
    settings = {"worlds": args.worlds, "models": args.models, "reps": args.reps, "backend": BACKEND}
    path = write_result(args.out, name="distributed_step", settings=settings, results=results)
    plot(results["worlds"], args.out / "distributed_step.png")
    print(f"wrote {path} and distributed_step.png")


def plot(by_world: dict, path: Path) -> None:
    """Step time and collectives per step, per model and world size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(by_world)
    models = list(next(iter(by_world.values())))
    fig, axes = plt.subplots(1, 2 * len(models), figsize=(5 * 2 * len(models), 3.6))
    for m, model_name in enumerate(models):
        for k, (key, label, log) in enumerate([("step_ms_median", "step time (ms)", False),
                                                ("collective_calls_per_step", "collectives per step", True)]):
            ax = axes[2 * m + k]
            width = 0.8 / len(PEERS)
            for j, name in enumerate(PEERS):
                values = [by_world[w][model_name]["peers"].get(name, {}).get(key, 0) for w in worlds]
                ax.bar([i + j * width for i in range(len(worlds))], values, width, label=name)
            ax.set_xticks([i + width * (len(PEERS) - 1) / 2 for i in range(len(worlds))], [f"{w} ranks" for w in worlds])
            ax.set_title(f"{model_name}: {label}")
            if log:
                ax.set_yscale("symlog")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
