"""blockopt optimizers inside transformers' Trainer: both ways in (docs/integrations.md), the
callback's logs, checkpoints and resuming exactly."""

from __future__ import annotations

import pytest
import torch

import blockopt
from blockopt.hf import create_optimizer, optimizer_cls_and_kwargs, trainer_hyperparameters
from blockopt.optim.momentum import kept_as

from .tiny import Tokens, assert_same_parameters, tiny_gpt2

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.hf

STEPS = 4


def training_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, report_to=[],
                    save_strategy="steps", save_steps=2, use_cpu=True, seed=0, disable_tqdm=True,
                    lr_scheduler_type="constant", learning_rate=1e-3, weight_decay=0.1)
    return transformers.TrainingArguments(**{**settings, **overrides})


class Sink(transformers.TrainerCallback):
    """Stands for a ``report_to`` integration: those are added before the user's callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def trainer(tmp_path, args=None, **overrides):
    """The recipe: a Trainer with `create_optimizer`'s optimizer (``overrides`` passed on), and the callback."""
    model = tiny_gpt2()
    args = args or training_args(tmp_path)
    sink = Sink()
    t = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[sink],
                             optimizers=(create_optimizer(model, args, **overrides), None))
    t.add_callback(blockopt.hf.BlockoptCallback(t))
    return t, model, sink


def metrics_logged(logs):
    return [entry for entry in logs if "optimizer/state_bytes" in entry]


def test_trainer_runs_logs_and_resumes_exactly(tmp_path):
    full, model, sink = trainer(tmp_path / "full")
    full.train()
    optimizer = full.optimizer.optimizer  # accelerate's wrapper
    assert int(optimizer.state[model.lm_head.weight]["step"]) == STEPS
    assert optimizer.plan == blockopt.partition(model)  # the structural plan
    # the Trainer saved the optimizer at step 2 through state_dict(): block statistics included
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert any(v["exp_avg_sq"].numel() < v["exp_avg"].numel() for v in saved["state"].values())
    # the callback logged once, after the first step, through Trainer.log: the sinks saw it
    (logged,) = metrics_logged(sink.logs)
    assert metrics_logged(full.state.log_history)[0]["step"] == 1
    summary = optimizer.plan.summary()
    assert logged["optimizer/state_bytes"] == blockopt.state_bytes(optimizer) > 0
    assert (logged["optimizer/blocks"], logged["optimizer/params"]) == (summary.n_blocks, summary.n_params)

    resumed, model2, sink2 = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert_same_parameters(model, model2)
    assert metrics_logged(sink2.logs)[0]["optimizer/state_bytes"] == logged["optimizer/state_bytes"]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_trainer_resumes_compressed_momentum_exactly(tmp_path, bf16):
    """int8 codes and scales go through the Trainer's optimizer.pt and back: the resumed run draws
    the same rounding bits (the step count is in the state) and ends bit for bit the same."""
    full, model, _ = trainer(tmp_path, training_args(tmp_path / "full", bf16=bf16), momentum_dtype="int8")
    full.train()
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    plan = full.optimizer.optimizer.plan
    names = {pid: name for g in saved["param_groups"] for pid, name in zip(g["params"], g["param_names"])}
    kept = {pid: kept_as("int8", plan[names[pid]]) for pid in saved["state"]}
    assert set(kept.values()) == {"int8", "bfloat16"}  # GPT-2's Conv1D columns and biases keep bf16
    for pid, entry in saved["state"].items():
        if kept[pid] == "int8":
            assert entry["exp_avg_codes"].dtype == torch.int8 and "exp_avg" not in entry
        else:
            assert entry["exp_avg"].dtype == torch.bfloat16 and "exp_avg_codes" not in entry
    resumed, model2, _ = trainer(tmp_path, training_args(tmp_path / "resumed", bf16=bf16), momentum_dtype="int8")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert_same_parameters(model, model2)


def test_create_optimizer_maps_training_arguments(tmp_path):
    model = tiny_gpt2()
    args = training_args(tmp_path, learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                         weight_decay=0.05, seed=17)
    opt = create_optimizer(model, args)
    assert type(opt) is blockopt.AdamMini
    assert {k: opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")} == dict(
        lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    assert opt.seed == 17  # the run's seed draws the rounding bits
    assert create_optimizer(model, args, lr=1e-2, rank=2, name="adapm").defaults["lr"] == 1e-2  # overrides win
    sgd = create_optimizer(model, args, "sgd-sai")
    assert type(sgd) is blockopt.SGDSaI
    assert (sgd.defaults["lr"], sgd.defaults["weight_decay"], sgd.defaults["momentum"]) == (3e-4, 0.05, 0.9)
    assert trainer_hyperparameters(args, "sgd-sai") == dict(lr=3e-4, weight_decay=0.05, seed=17, decay_1d=False)
    assert sgd.seed == 17 and create_optimizer(model, args, name="adapm", rank=2).seed == 17
    with pytest.raises(ValueError, match="name must be one of 'adam-mini', 'adapm', 'sgd-sai', got 'adam'"):
        create_optimizer(model, args, "adam")
    for bad in ((model, None), (args, model)):  # (the arguments swapped or left out: an AttributeError deep inside)
        with pytest.raises(TypeError, match=r"training_args must be transformers.TrainingArguments"):
            create_optimizer(*bad)
    with pytest.raises(TypeError, match=r"BlockoptCallback takes the Trainer it logs to .*got TrainingArguments"):
        blockopt.hf.BlockoptCallback(args)


@pytest.mark.parametrize("name", ["adam-mini", "adapm", "sgd-sai"])
def test_the_optimizer_decays_the_tensors_the_trainer_decays(tmp_path, name):
    """Weight decay alone (zero gradients) moves exactly the Trainer's decay set: its own optimizers
    exempt biases and norms. SGD-SaI's own default decays them; made for the Trainer, it does not."""
    model = tiny_gpt2()
    args = training_args(tmp_path, learning_rate=1e-2, weight_decay=0.5)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    expected = set(trainer.get_decay_parameter_names(model)) & dict(model.named_parameters()).keys()  # (tied: once)
    opt = create_optimizer(model, args, name, **({"rank": 2} if name == "adapm" else {}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == expected and any(p.ndim == 1 for n, p in model.named_parameters() if n not in moved)


def test_an_optimizer_class_gets_no_structure_and_says_so(tmp_path):
    """What transformers does with ``optimizer_cls_and_kwargs=(blockopt.AdamMini, {...})``: bare
    param groups, so blocks from shapes only, with a PartitionWarning; the factory keeps the plan."""
    model = tiny_gpt2()
    args = training_args(tmp_path)
    as_class = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                    optimizer_cls_and_kwargs=(blockopt.AdamMini, {"lr": 1e-3}))
    with pytest.warns(blockopt.PartitionWarning, match="without names"):
        shapes_only = as_class.create_optimizer()
    structural = blockopt.partition(model)
    assert shapes_only.plan.summary().n_blocks > structural.summary().n_blocks

    factory, kwargs = optimizer_cls_and_kwargs(args, weight_decay=0.0)
    assert kwargs == dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, seed=0, decay_1d=False)
    as_factory = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                      optimizer_cls_and_kwargs=(factory, kwargs))
    assert as_factory.create_optimizer().plan == structural
    assert "factory of AdamMini" in repr(factory)
