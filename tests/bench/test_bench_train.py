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


class OneSlowStep(torch.optim.SGD):
    """SGD whose 8th step stalls, as a page fault or another process would."""

    def __init__(self, params, stall):
        super().__init__(params, lr=1e-3)
        self.stall, self.calls = stall, 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls == 8:
            import time

            time.sleep(self.stall)
        return super().step(closure)


def test_tokens_per_s_is_taken_at_the_median_step(data):
    """One stalled step doesn't move tokens/s (Note [tokens/s at the median step]); a total over
    the run would have put it below batch tokens / stall."""
    stall = 2.0
    result = train_run("llama-tiny", lambda m: OneSlowStep(m.parameters(), stall), data, loop(20), **QUIET)
    assert result.tokens_per_s > 8 * 32 * 20 / stall


def test_adam_mini_trains_in_the_loop(data):
    result = train_run("llama-tiny", lambda m: blockopt.AdamMini(m, lr=3e-3), data, loop(20), **QUIET)
    assert result.optimizer == "AdamMini"
    assert result.final_train_loss < result.train_curve[0][1] - 0.5
    assert result.state_bytes < 0.6 * result.n_params * 8  # about half of AdamW's


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        loop(0)
    with pytest.raises(TypeError, match="loop must be a TrainConfig"):
        train_run("llama-tiny", adamw(), data, {"steps": 1}, **QUIET)
    with pytest.raises(ValueError, match="more than seq_len"):
        train_run("llama-tiny", adamw(), data._replace(val=data.val[:10]), loop(1), **QUIET)
    with pytest.raises(ValueError, match="exceeds the model's maximum sequence length 64"):
        train_run("llama-tiny", adamw(), data, loop(1, seq_len=65), **QUIET)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.parametrize("shared_floor", [False, True])
def test_shared_floor_ends_every_blockwise_group_at_the_base_floor(data, schedule, shared_floor):
    base, floor_ratio, steps = 1e-3, 0.1, 12
    lrs: list[dict[str, float]] = []
    holder = {}

    def make(model):
        groups = blockopt.blockwise_lr(model, lr=base, weight_decay=0.1)
        holder["opt"] = torch.optim.AdamW(groups)
        return holder["opt"]

    def record(step, loss):  # after each step: the LR the next step will use
        lrs.append({g["block_type"]: g["lr"] for g in holder["opt"].param_groups})

    settings = loop(steps, warmup_steps=3, min_lr_ratio=floor_ratio, schedule=schedule, shared_floor=shared_floor)
    train_run("llama-tiny", make, data, settings, callback=record, **QUIET)
    ratios = {g["block_type"]: g["lr_ratio"] for g in holder["opt"].param_groups}
    assert len(set(ratios.values())) > 1  # the test means something only with unequal ratios
    peak_step = lrs[1]  # after step 2 of a 3-step warm-up: the peak
    for block_type, ratio in ratios.items():
        assert peak_step[block_type] == pytest.approx(base * ratio)
        # `lrs[-1]` is the schedule at `steps`, the end of the decay: the floor.
        expected_floor = base * floor_ratio if shared_floor else base * ratio * floor_ratio
        assert lrs[-1][block_type] == pytest.approx(expected_floor, rel=1e-6)
    # In between, every group is the same fraction of the way from its peak to its floor.
    for step_lrs in lrs[1:]:
        progress = {
            t: (ratios[t] * base - lr) / (ratios[t] * base - (base if shared_floor else ratios[t] * base) * floor_ratio)
            for t, lr in step_lrs.items()
        }
        assert max(progress.values()) - min(progress.values()) < 1e-9


def test_shared_floor_rejects_a_group_without_a_usable_lr_ratio(data):
    def make(model):
        return torch.optim.AdamW([{"params": list(model.parameters()), "lr_ratio": 0.0}], lr=1e-3)

    with pytest.raises(ValueError, match="^param group 0's lr_ratio must be a number > 0, got 0.0: shared_floor divides by it$"):
        train_run("llama-tiny", make, data, loop(2, shared_floor=True), **QUIET)


def test_shared_floor_keeps_a_group_below_the_floor_at_its_peak(data):
    lrs = []
    holder = {}

    def make(model):
        params = list(model.parameters())
        holder["opt"] = torch.optim.AdamW([
            {"params": params[:1], "lr": 1e-4, "lr_ratio": 0.05},  # base 2e-3: the floor 2e-4 is above its peak
            {"params": params[1:], "lr": 2e-3, "lr_ratio": 1.0},
        ])
        return holder["opt"]

    train_run("llama-tiny", make, data, loop(6, warmup_steps=1, min_lr_ratio=0.1, shared_floor=True),
              callback=lambda step, loss: lrs.append([g["lr"] for g in holder["opt"].param_groups]), **QUIET)
    assert all(low == pytest.approx(1e-4) for low, _ in lrs)
    assert lrs[-1][1] == pytest.approx(2e-4)


def test_the_loop_as_keywords_still_works_with_its_old_defaults(data):
    """Deprecated: train_run(..., steps=, batch_size=, seq_len=, ...) from before TrainConfig, with
    that signature's defaults (10% warm-up, validation every 50 steps)."""
    with pytest.warns(DeprecationWarning, match=r"pass loop=TrainConfig"):
        old = train_run("llama-tiny", adamw(), data, steps=12, batch_size=8, seq_len=32, eval_batches=2, seed=3, **QUIET)
    new = train_run("llama-tiny", adamw(), data, TrainConfig(steps=12, batch_size=8, seq_len=32, eval_batches=2,
                                                             warmup_steps=1, eval_every=50), seed=3, **QUIET)
    assert old.train_curve == new.train_curve and old.val_curve == new.val_curve
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['stepz'\]"):
        train_run("llama-tiny", adamw(), data, stepz=3, **QUIET)
    with pytest.raises(TypeError, match=r"pass one of them"):
        train_run("llama-tiny", adamw(), data, loop(3), steps=3, **QUIET)
