"""What each rank runs in the DeepSpeed ZeRO tests (spawned by ``test_zero.py``).

The models, data and loss are `_worker`'s (rank ``r`` of ``w`` takes rows ``r*B/w ..`` of a fixed
global batch, so DeepSpeed's averaged gradient is the one-process gradient of the whole batch).
Every scenario of a spawn runs in the same processes, one DeepSpeed engine after another; results
go to ``out/<name>.rank<r>.pt``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

import blockopt
import blockopt.hf
from blockopt.distributed import AllReduceCounter

from . import _worker

# lr 1e-2, not the FSDP tests' 3e-2: at 3e-2 these tiny models amplify fp32 rounding so much
# that one process with the batch summed in 3 chunks is 7e-5 (Llama) from itself after 20 steps
HYPER = {**_worker.HYPER, "lr": 1e-2}

OPTIMIZERS = {
    "adam-mini": lambda model: blockopt.AdamMini(model, **HYPER),
    "sgd-sai": lambda model: blockopt.SGDSaI(model, lr=1e-3, momentum=0.9, weight_decay=0.1, blocks="plan"),
    "adapm": lambda model: blockopt.AdaPM(model, **HYPER, momentum="full"),
    "adapm-lowrank": lambda model: blockopt.AdaPM(model, **HYPER, rank=2),
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), **HYPER),
    # compressed first moments: bf16 pieces draw the rounding bits of their place in the parameter
    "adam-mini-bf16m": lambda model: blockopt.AdamMini(model, **HYPER, momentum_dtype="bfloat16"),
    "adam-mini-int8m": lambda model: blockopt.AdamMini(model, **HYPER, momentum_dtype="int8"),
    # another plan of the same model: bare names (query and key planned per row, not per head)
    "adam-mini-names": lambda model: blockopt.AdamMini(model.named_parameters(), **HYPER),
}


def model_of(name: str) -> torch.nn.Module:
    """The model in float32 (DeepSpeed keeps fp32 master weights; with bf16 it casts the model)."""
    return _worker.MODELS[name]().float()


def config(stage: int, world: int, dtype: str) -> dict:
    return {
        "train_batch_size": _worker.GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": _worker.GLOBAL_BATCH // world,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the references do not clip
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 10**9,
    }


def engine_for(model_name: str, optimizer: str, stage: int, world: int, dtype: str):
    import deepspeed

    model = model_of(model_name)
    engine, *_ = deepspeed.initialize(model=model, optimizer=OPTIMIZERS[optimizer](model), config=config(stage, world, dtype))
    return engine


def train(engine, data, rank: int, world: int) -> None:
    for window in data:
        loss = _worker.loss_of(engine, _worker.local_rows(window, rank, world).to(engine.device))
        engine.backward(loss)
        engine.step()


def full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {name: p.detach().double().clone() for name, p in engine.module.named_parameters()}


class StepCounter:
    """Counts all-reduces made inside the client optimizer's step (DeepSpeed's own are outside)."""

    def __init__(self, optimizer):
        self.calls, self.steps = 0, 0
        self._counter = AllReduceCounter()
        optimizer.register_step_pre_hook(lambda *_: self._enter())
        optimizer.register_step_post_hook(lambda *_: self._exit())

    def _enter(self) -> None:
        self._counter.__enter__()

    def _exit(self) -> None:
        self._counter.__exit__(None, None, None)
        self.calls, self.steps = self.calls + self._counter.calls, self.steps + 1
        self._counter.calls = 0


# ---- scenarios --------------------------------------------------------------------------
def scenario_train(rank, world, out: Path, model_name: str, optimizer: str, stage: int, dtype: str, steps: int) -> None:
    engine = engine_for(model_name, optimizer, stage, world, dtype)
    counter = StepCounter(engine.optimizer.optimizer) if hasattr(engine.optimizer, "optimizer") else None
    train(engine, _worker.batches(steps), rank, world)
    result = {"params": full_params(engine), "state_bytes": blockopt.state_bytes(engine.optimizer)}
    if counter is not None:
        result.update(all_reduce_calls=counter.calls, client_steps=counter.steps)
    zero = getattr(engine.optimizer, "optimizer", None).__dict__.get("_zero")
    if zero is not None:  # the rules of the blocks this rank's pieces share with other pieces
        result["cut_rules"] = sorted({piece.spec.rule for part in zero.partitions for piece in part.pieces
                                      if id(piece.layout) in part.slots})
    torch.save(result, out / f"{model_name}_{optimizer}_z{stage}_{dtype}_s{steps}_w{world}.rank{rank}.pt")


def scenario_refused(rank, world, out: Path, model_name: str, optimizer: str, stage: int) -> None:
    """The error a step raises (saved as text)."""
    engine = engine_for(model_name, optimizer, stage, world, "float32")
    try:
        train(engine, _worker.batches(1), rank, world)
        message = ""
    except (NotImplementedError, RuntimeError, ValueError) as error:
        message = str(error)
    torch.save({"error": message}, out / f"refused_{model_name}_{optimizer}_z{stage}_w{world}.rank{rank}.pt")


def checkpoint_dir(out: Path, model_name: str, stage: int, world: int, optimizer: str = "adam-mini") -> Path:
    return out / f"ckpt_{model_name}_{optimizer}_z{stage}_w{world}"


def scenario_checkpoint(rank, world, out: Path, model_name: str, stage: int, split: int, steps: int,
                        optimizer: str = "adam-mini") -> None:
    """Train ``split`` steps, save with ``engine.save_checkpoint``, train on; then a new engine
    loads the checkpoint and trains the same steps: both results are saved."""
    data = _worker.batches(steps)
    folder = checkpoint_dir(out, model_name, stage, world, optimizer)
    engine = engine_for(model_name, optimizer, stage, world, "float32")
    train(engine, data[:split], rank, world)
    engine.save_checkpoint(str(folder))
    train(engine, data[split:], rank, world)
    straight = full_params(engine)
    engine = engine_for(model_name, optimizer, stage, world, "float32")
    engine.load_checkpoint(str(folder))
    train(engine, data[split:], rank, world)
    result = {"straight": straight, "resumed": full_params(engine)}
    torch.save(result, out / f"checkpoint_{model_name}_{optimizer}_z{stage}_w{world}.rank{rank}.pt")


def _snapshot(client) -> tuple[list[dict], list[dict]]:
    """A ZeRO client's pieces' state (copied) and its groups' settings."""
    pieces = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in piece.items()}
              for entry in client.state.values() for piece in entry.get("pieces", ())]
    return pieces, [{k: v for k, v in g.items() if k != "params"} for g in client.param_groups]


def scenario_load_refused(rank, world, out: Path, model_name: str, stage: int, saved: str, loading: str) -> None:
    """``engine.load_checkpoint`` of a checkpoint that ``saved`` wrote into an engine built with
    ``loading``: the error, and whether the client's state and groups were left as they were."""
    engine = engine_for(model_name, loading, stage, world, "float32")
    train(engine, _worker.batches(1), rank, world)
    client = engine.optimizer.optimizer
    before = _snapshot(client)
    try:
        engine.load_checkpoint(str(checkpoint_dir(out, model_name, stage, world, saved)))
        message = ""
    except (ValueError, RuntimeError, KeyError) as error:
        message = str(error)
    after = _snapshot(client)
    unchanged = before[1] == after[1] and len(before[0]) == len(after[0]) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
        for a, b in zip(before[0], after[0]))
    torch.save({"error": message, "unchanged": unchanged},
               out / f"load_refused_{model_name}_{saved}_into_{loading}_z{stage}_w{world}.rank{rank}.pt")


def scenario_resume_from_state(rank, world, out: Path, model_name: str, stage: int, split: int, steps: int,
                               saved_world: int, saved: str = "adam-mini", loading: str = "adam-mini") -> None:
    """Resume at this world size and stage from a ZeRO checkpoint saved at another (by ``saved``,
    into an engine built with ``loading``): the model's weights from DeepSpeed's consolidated fp32
    state, the optimizer's from `blockopt.deepspeed`."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import blockopt.deepspeed

    folder = str(checkpoint_dir(out, model_name, stage, saved_world, saved))
    model = model_of(model_name)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(folder), strict=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=OPTIMIZERS[loading](model), config=config(stage, world, "float32"))
    blockopt.deepspeed.load_state(engine, blockopt.deepspeed.zero_to_state(folder))
    train(engine, _worker.batches(steps)[split:], rank, world)
    torch.save({"params": full_params(engine)},
               out / f"resume_{model_name}_{saved}_into_{loading}_z{stage}_w{saved_world}_to_w{world}.rank{rank}.pt")


def scenario_trainer(rank, world, out: Path, stage: int, steps: int) -> None:
    """The HF Trainer's ``deepspeed=`` path: a blockopt optimizer handed to the Trainer, which
    builds the engine through accelerate; a tiny GQA Llama from transformers."""
    from accelerate import PartialState
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 37, (4 * world * steps, 8), generator=g)]
    # On a GPU machine the Trainer sets this up itself; on CPU only, accelerate would see no backend
    # for DeepSpeed and count one process, so the state is configured here (gloo) and reused.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    args = TrainingArguments(
        output_dir=str(out / f"trainer_z{stage}_w{world}"), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, lr_scheduler_type="constant",
        accelerator_config={"use_configured_state": True},
        deepspeed={"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                   "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"},
    )
    # with deepspeed= the Trainer drops an optimizer passed in optimizers= and builds its own:
    # optimizer_cls_and_kwargs is how a blockopt optimizer (planned from the model) gets there
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=blockopt.hf.optimizer_cls_and_kwargs(args))
    trainer.train()
    optimizer = trainer.optimizer.optimizer.optimizer  # accelerate's wrapper -> ZeRO -> the client
    zero = optimizer.__dict__.get("_zero")
    result = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "stage": zero.stage if zero is not None else None,
        "pieces": sum(len(part.pieces) for part in zero.partitions) if zero is not None else 0,
        "optimizer": type(optimizer).__name__,
        "n_blocks": {k: optimizer.plan[k].n_blocks for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight")},
    }
    torch.save(result, out / f"trainer_z{stage}_w{world}.rank{rank}.pt")


def qwen2() -> torch.nn.Module:
    """Qwen2-0.5B's shape at a reduced width: 14 query heads and 2 KV heads of 8, q/k/v biases,
    tied embeddings (the model the official adam-mini fails on under ZeRO-3)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=37, hidden_size=112, intermediate_size=152, num_hidden_layers=1, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def qwen2_batches(steps: int, world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 37, (world, _worker.SEQ + 1), generator=g) for _ in range(steps)]


def scenario_qwen2(rank, world, out: Path, steps: int) -> None:
    import deepspeed

    model = qwen2()
    cfg = {**config(3, world, "float32"), "train_batch_size": world, "train_micro_batch_size_per_gpu": 1}
    engine, *_ = deepspeed.initialize(model=model, optimizer=blockopt.AdamMini(model, **HYPER), config=cfg)
    for window in qwen2_batches(steps, world):
        engine.backward(_worker.loss_of(engine, window[rank:rank + 1]))
        engine.step()
    zero = engine.optimizer.optimizer._zero
    cut = sorted({piece.spec.role for part in zero.partitions for piece in part.pieces if id(piece.layout) in part.slots})
    torch.save({"params": full_params(engine), "cut_roles": cut}, out / f"qwen2_z3_w{world}.rank{rank}.pt")


SCENARIOS = {
    "qwen2": scenario_qwen2,
    "trainer": scenario_trainer,
    "train": scenario_train, "refused": scenario_refused, "checkpoint": scenario_checkpoint,
    "load_refused": scenario_load_refused,
    "resume_from_state": scenario_resume_from_state,
}


def main(rank: int, world: int, port: int, out: str, plan: list[tuple[str, dict]]) -> None:
    """Entry point of a spawned rank: run every scenario of ``plan`` in order."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    _worker.run_plan(SCENARIOS, rank, world, out, plan)
