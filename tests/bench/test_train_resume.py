"""The training loop's schedules, reproducibility and checkpoint/resume (bit for bit)."""

import pytest
import torch

from blockopt.bench.modelspec import ModelSpec
from blockopt.bench.peers import build_optimizer, get_peer, registered_optimizers
from blockopt.bench.train import CHECKPOINT_FILE, TrainConfig, lr_factor, train_run

SHARED = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
LOOP = TrainConfig(steps=9, batch_size=4, seq_len=32, eval_every=3, eval_batches=1, warmup_steps=2)
QUIET = {"progress": False}


class Interrupt(Exception):
    """Stands for the process being killed."""


def make(name):
    return lambda model: build_optimizer(name, model, SHARED)


def interrupt_at(step_to_fail):
    def callback(step, loss):
        if step == step_to_fail:
            raise Interrupt

    return callback


def test_wsd_and_constant_schedules():
    wsd = [lr_factor(s, steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2) for s in range(100)]
    assert wsd[4] == pytest.approx(0.5) and wsd[9] == 1.0
    assert set(wsd[10:80]) == {1.0}  # stable until the last 20%
    assert wsd[80] == 1.0 and wsd[90] == pytest.approx(1.0 - 0.9 * 0.5)  # linear decay
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:]))
    assert wsd[99] == pytest.approx(0.1 + 0.9 / 20)
    assert lr_factor(150, steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd") == pytest.approx(0.1)
    constant = [lr_factor(s, steps=50, warmup_steps=5, min_lr_ratio=0.1, schedule="constant") for s in range(50)]
    assert constant[0] == pytest.approx(0.2) and set(constant[5:]) == {1.0}
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_factor(20, steps=50, warmup_steps=5, min_lr_ratio=0.1, schedule="linear")


def test_the_schedule_reaches_the_optimizer(tiny_split):
    """The LR the optimizer steps with follows the chosen schedule (peak after warm-up for WSD)."""
    seen = []

    def spy(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
        return optimizer

    loop = LOOP.replace(steps=10, warmup_steps=2, schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.0)
    train_run("llama-tiny", spy, tiny_split, loop, **QUIET)
    assert seen == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match="schedule must be one of 'cosine', 'wsd', 'constant', got 'step'"):
        LOOP.replace(schedule="step")


def test_same_seed_same_curves_and_the_callers_rng_is_untouched(tiny_split):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = train_run("gpt2-tiny", make("adam-mini"), tiny_split, LOOP.replace(schedule="wsd"), seed=5, **QUIET)
    assert torch.equal(torch.rand(3), expected_next)  # the run forked the global RNG
    second = train_run("gpt2-tiny", make("adam-mini"), tiny_split, LOOP.replace(schedule="wsd"), seed=5, **QUIET)
    assert first.train_curve == second.train_curve and first.val_curve == second.val_curve
    assert first.final_val_loss == second.final_val_loss


# the peers, then blockopt's other optimizers (registered once they exist)
RESUMABLE = [
    "adamw", "adam-mini", "adam-mini-official", "sgd-sai", "lion", "adafactor",
    "sgd-sai-blockopt", "adapm", "adam-mini-blockwise-lr",
]


@pytest.mark.parametrize("name", RESUMABLE)
def test_an_interrupted_run_resumes_to_the_identical_result(name, tiny_split, tmp_path):
    if name not in registered_optimizers():
        pytest.skip(f"{name} is not registered (its blockopt class does not exist yet)")
    if not get_peer(name).available:
        pytest.skip(f"{name} needs {get_peer(name).requires}")
    straight = train_run("llama-tiny", make(name), tiny_split, LOOP, seed=1, **QUIET)

    folder = tmp_path / "run"
    # checkpoints at steps 3 and 6; "killed" at step 8, so steps 7-8 are lost and redone
    with pytest.raises(Interrupt):
        train_run("llama-tiny", make(name), tiny_split, LOOP, seed=1, checkpoint_dir=folder, callback=interrupt_at(8), **QUIET)
    assert torch.load(folder / CHECKPOINT_FILE, weights_only=True)["step"] == 6
    steps_run = []
    resumed = train_run(
        "llama-tiny", make(name), tiny_split, LOOP, seed=1, checkpoint_dir=folder, resume=True,
        callback=lambda step, loss: steps_run.append(step), **QUIET,
    )
    assert steps_run == [7, 8, 9]
    assert resumed.resumed_from == [6]
    assert resumed.train_curve == straight.train_curve  # bit for bit: exact float equality
    assert resumed.val_curve == straight.val_curve
    assert resumed.final_train_loss == straight.final_train_loss
    assert resumed.state_bytes == straight.state_bytes


@pytest.mark.hf
def test_resume_restores_the_dropout_rng_of_an_hf_model(tiny_split, tmp_path):
    """HF GPT-2 keeps its default dropout (0.1): the global RNG must be part of the checkpoint."""
    pytest.importorskip("transformers")
    spec = ModelSpec.parse("hf:gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 512, "n_positions": 32})
    assert spec.config.resid_pdrop > 0
    loop = LOOP.replace(steps=6, eval_every=2)
    straight = train_run(spec, make("adamw"), tiny_split, loop, seed=2, **QUIET)
    with pytest.raises(Interrupt):
        train_run(spec, make("adamw"), tiny_split, loop, seed=2, checkpoint_dir=tmp_path, callback=interrupt_at(3), **QUIET)
    resumed = train_run(spec, make("adamw"), tiny_split, loop, seed=2, checkpoint_dir=tmp_path, resume=True, **QUIET)
    assert resumed.resumed_from == [2] and resumed.train_curve == straight.train_curve


def test_resume_of_a_finished_run_trains_nothing(tiny_split, tmp_path):
    first = train_run("llama-tiny", make("adamw"), tiny_split, LOOP, checkpoint_dir=tmp_path, **QUIET)
    calls = []
    again = train_run(
        "llama-tiny", make("adamw"), tiny_split, LOOP, checkpoint_dir=tmp_path, resume=True,
        callback=lambda *a: calls.append(a), **QUIET,
    )
    assert calls == [] and again.train_curve == first.train_curve and again.val_curve == first.val_curve
    assert again.state_bytes == first.state_bytes and again.resumed_from == [LOOP.steps]


def test_resume_refuses_a_checkpoint_of_other_settings(tiny_split, tmp_path):
    with pytest.raises(Interrupt):
        train_run("llama-tiny", make("adamw"), tiny_split, LOOP, checkpoint_dir=tmp_path, fingerprint={"lr": 1e-3, "opt": "adamw"},
                  callback=interrupt_at(4), **QUIET)
    with pytest.raises(ValueError, match=r"different settings \(differ: lr: 0.001 saved, 0.002 now\)"):
        train_run("llama-tiny", make("adamw"), tiny_split, LOOP, checkpoint_dir=tmp_path, resume=True,
                  fingerprint={"lr": 2e-3, "opt": "adamw"}, **QUIET)


def test_a_fingerprint_mismatch_names_the_nested_settings_and_both_values():
    from blockopt.bench.checkpoint import fingerprint_mismatch

    saved = {"hyperparameters": {"lr": 1e-3, "eps": 1e-8}, "loop": {"eval_every": 10}, "model": "demo"}
    now = {"hyperparameters": {"lr": 2e-3, "eps": 1e-8}, "loop": {"eval_every": 40}, "model": "demo", "seed": 1}
    assert fingerprint_mismatch(saved, now) == ["hyperparameters.lr: 0.001 saved, 0.002 now",
                                                "loop.eval_every: 10 saved, 40 now", "seed: None saved, 1 now"]


def test_without_resume_an_old_checkpoint_is_ignored_and_replaced(tiny_split, tmp_path):
    with pytest.raises(Interrupt):
        train_run("llama-tiny", make("adamw"), tiny_split, LOOP, seed=3, checkpoint_dir=tmp_path, callback=interrupt_at(4), **QUIET)
    steps_run = []
    fresh = train_run("llama-tiny", make("adamw"), tiny_split, LOOP, seed=0, checkpoint_dir=tmp_path,
                      callback=lambda step, loss: steps_run.append(step), **QUIET)
    assert steps_run == list(range(1, 10)) and fresh.resumed_from == []
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 9


def test_checkpoint_arguments_are_checked(tiny_split):
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        train_run("llama-tiny", make("adamw"), tiny_split, LOOP, resume=True, **QUIET)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1 or None, got -1"):
        train_run("llama-tiny", make("adamw"), tiny_split, LOOP, checkpoint_every=-1, **QUIET)
