"""The training loop: LR schedule, reproducibility, identical batches across optimizers, learning."""

import math

import pytest
import torch

import blockopt
from blockopt.bench.corpus import load_corpus, split_ids
from blockopt.bench.tokenizer import tokenize_corpus
from blockopt.bench.train import lr_factor, train_run

LOOP = dict(batch_size=8, seq_len=32, eval_every=10, eval_batches=2, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOCKOPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return split_ids(tokenize_corpus(load_corpus(max_bytes=60_000), 512).ids)


def adamw(lr=3e-3):
    return lambda model: torch.optim.AdamW(model.parameters(), lr=lr)


def test_lr_factor_warms_up_linearly_then_decays_to_the_floor():
    factor = [lr_factor(s, steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert factor[0] == pytest.approx(0.1) and factor[4] == pytest.approx(0.5) and factor[9] == 1.0
    assert factor[10] == 1.0 and factor[55] == pytest.approx(0.55)  # cosine midpoint
    assert all(a >= b for a, b in zip(factor[9:], factor[10:]))
    assert factor[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(200, steps=100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_same_seed_gives_bit_identical_runs(data):
    first = train_run("llama-tiny", adamw(), data, steps=12, seed=3, **LOOP)
    second = train_run("llama-tiny", adamw(), data, steps=12, seed=3, **LOOP)
    assert first.train_curve == second.train_curve and first.val_curve == second.val_curve
    other = train_run("llama-tiny", adamw(), data, steps=12, seed=4, **LOOP)
    assert other.train_curve != first.train_curve


def test_init_and_batches_do_not_depend_on_the_optimizer(data):
    """With lr=0 nothing trains, so equal losses mean equal initial weights and equal batches."""
    frozen_sgd = train_run("gpt2-tiny", lambda m: torch.optim.SGD(m.parameters(), lr=0.0), data, steps=6, **LOOP)
    frozen_adam = train_run("gpt2-tiny", adamw(lr=0.0), data, steps=6, **LOOP)
    assert frozen_sgd.train_curve == frozen_adam.train_curve
    assert len({loss for _, loss in frozen_sgd.train_curve}) > 1  # and the batches do change


def test_loss_decreases_and_result_fields(data):
    result = train_run("llama-tiny", adamw(), data, steps=40, seed=0, **LOOP)
    assert [s for s, _ in result.train_curve] == list(range(1, 41))
    assert [s for s, _ in result.val_curve] == [10, 20, 30, 40]
    initial = result.train_curve[0][1]
    assert initial == pytest.approx(math.log(512), abs=0.2)
    assert result.final_train_loss < initial - 1.0
    assert result.final_val_loss < result.val_curve[0][1]
    assert result.final_train_loss == pytest.approx(sum(l for _, l in result.train_curve[-10:]) / 10)
    # AdamW keeps two float32 tensors per parameter (plus one step counter per tensor).
    assert result.n_params * 8 <= result.state_bytes < result.n_params * 8 + 1024
    assert result.optimizer == "AdamW" and result.step_ms > 0 and result.tokens_per_s > 0
    assert result.wall_s > 0 and result.to_dict()["n_params"] == result.n_params


def test_adam_mini_trains_in_the_loop(data):
    result = train_run("llama-tiny", lambda m: blockopt.AdamMini(m, lr=3e-3), data, steps=20, **LOOP)
    assert result.optimizer == "AdamMini"
    assert result.final_train_loss < result.train_curve[0][1] - 0.5
    assert result.state_bytes < 0.6 * result.n_params * 8  # about half of AdamW's


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="must be positive"):
        train_run("llama-tiny", adamw(), data, steps=0, **LOOP)
    with pytest.raises(ValueError, match="more than seq_len"):
        train_run("llama-tiny", adamw(), data._replace(val=data.val[:10]), steps=1, **LOOP)
