"""The training loop: LR schedule, reproducibility, identical batches across optimizers, learning."""

import math

import pytest
import torch

import blockopt
from blockopt.bench.corpus import load_corpus, split_ids
from blockopt.bench.tokenizer import tokenize_corpus
from blockopt.bench.train import TrainConfig, lr_factor, train_run

def loop(steps, **changes):
    """Small batches; a 10% warm-up (what these tests were written with)."""
    settings = dict(batch_size=8, seq_len=32, warmup_steps=max(1, steps // 10), eval_every=10, eval_batches=2)
    return TrainConfig(steps=steps, **{**settings, **changes})


QUIET = {"progress": False}


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
    first = train_run("llama-tiny", adamw(), data, loop(12), seed=3, **QUIET)
    second = train_run("llama-tiny", adamw(), data, loop(12), seed=3, **QUIET)
    assert first.train_curve == second.train_curve and first.val_curve == second.val_curve
    other = train_run("llama-tiny", adamw(), data, loop(12), seed=4, **QUIET)
    assert other.train_curve != first.train_curve


def test_init_and_batches_do_not_depend_on_the_optimizer(data):
    """With lr=0 nothing trains, so equal losses mean equal initial weights and equal batches."""
    frozen_sgd = train_run("gpt2-tiny", lambda m: torch.optim.SGD(m.parameters(), lr=0.0), data, loop(6), **QUIET)
    frozen_adam = train_run("gpt2-tiny", adamw(lr=0.0), data, loop(6), **QUIET)
    assert frozen_sgd.train_curve == frozen_adam.train_curve
    assert len({loss for _, loss in frozen_sgd.train_curve}) > 1  # and the batches do change


def test_loss_decreases_and_result_fields(data):
    result = train_run("llama-tiny", adamw(), data, loop(40), seed=0, **QUIET)
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


class FakeClock:
    """A perf_counter that ticks 1 ms per reading, so the test reads no real time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1e-3
        return self.now


class OneSlowStep(torch.optim.SGD):
    """SGD whose 8th step stalls (on the fake clock), as a page fault or another process would."""

    def __init__(self, params, clock, stall):
        super().__init__(params, lr=1e-3)
        self.clock, self.stall, self.calls = clock, stall, 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls == 8:
            self.clock.now += self.stall
        return super().step(closure)


@pytest.mark.parametrize("stall", [0.0, 100.0])
def test_tokens_per_s_is_taken_at_the_median_step(data, monkeypatch, stall):
    """One stalled step doesn't move tokens/s or step_ms (Note [tokens/s at the median step]); a
    total over the run would have put tokens/s below batch tokens / stall."""
    from blockopt.bench import train

    clock = FakeClock()
    monkeypatch.setattr(train.time, "perf_counter", clock)
    result = train_run("llama-tiny", lambda m: OneSlowStep(m.parameters(), clock, stall), data, loop(20), **QUIET)
    baseline = FakeClock()
    monkeypatch.setattr(train.time, "perf_counter", baseline)
    steady = train_run("llama-tiny", lambda m: OneSlowStep(m.parameters(), baseline, 0.0), data, loop(20), **QUIET)
    assert result.tokens_per_s == pytest.approx(steady.tokens_per_s) and result.step_ms == pytest.approx(steady.step_ms)
    assert result.tokens_per_s > 0 and result.wall_s >= stall
