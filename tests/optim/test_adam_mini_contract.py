"""AdamMini's side of the torch.optim contract beyond what test_conformance.py checks for every
optimizer: named inputs, exact low-precision rounding, GradScaler, torch.compile, deepcopy/pickle."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import blockopt
from blockopt.optim.state import EXP_AVG, EXP_AVG_SQ

from .conftest import VOCAB, batches, lm_loss, make_tiny, max_param_diff, train


def _grads_like(model, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * scale for p in model.parameters()]


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def test_module_and_named_parameters_give_the_same_steps():
    a = make_tiny()
    b = copy.deepcopy(a)
    opt_a = blockopt.AdamMini(a, lr=1e-2, weight_decay=0.1)
    opt_b = blockopt.AdamMini(b.named_parameters(), lr=1e-2, weight_decay=0.1, plan=opt_a.plan)
    data = batches(5)
    train(a, opt_a, data)
    train(b, opt_b, data)
    assert max_param_diff(a, b) == 0.0


def test_state_shapes_and_dtypes():
    model = make_tiny()
    opt = blockopt.AdamMini(model)
    train(model, opt, batches(1))
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert state["step"].dtype == torch.float32 and state["step"].item() == 1
        assert state[EXP_AVG].shape == p.shape
        assert state[EXP_AVG_SQ].shape == (opt.plan[name].n_blocks,)
    # heads really are coarser than AdamW: the packed in_proj has 4 + 4 + 16 blocks, not 768 values
    in_proj = model.block.self_attn.in_proj_weight
    assert opt.state[in_proj][EXP_AVG_SQ].numel() == 4 + 4 + 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_block_moments(dtype):
    model_lp = make_tiny(torch.float32).to(dtype)
    model32 = copy.deepcopy(model_lp).float()  # the same (rounded) start in float32
    opt32 = blockopt.AdamMini(model32, lr=1e-2, weight_decay=0.1)
    opt_lp = blockopt.AdamMini(model_lp, lr=1e-2, weight_decay=0.1)
    grads = [g.to(dtype) for g in _grads_like(model32)]
    _set_grads(model_lp, grads)
    _set_grads(model32, [g.float() for g in grads])
    opt32.step()
    opt_lp.step()
    for p32, p_lp in zip(model32.parameters(), model_lp.parameters()):
        assert p_lp.dtype == dtype
        assert opt_lp.state[p_lp][EXP_AVG].dtype == dtype
        assert opt_lp.state[p_lp][EXP_AVG_SQ].dtype == torch.float32
        torch.testing.assert_close(opt_lp.state[p_lp][EXP_AVG_SQ], opt32.state[p32][EXP_AVG_SQ], rtol=0, atol=0)
        # the math runs in float32 and rounds once on write-back: the float32 result, rounded
        assert torch.equal(p_lp, p32.detach().to(dtype))
        assert not torch.equal(p_lp.float(), p32.detach())  # (and rounding did happen)


def test_zero_grad_sets_grads_to_none():
    model = make_tiny()
    opt = blockopt.AdamMini(model)
    lm_loss(model, batches(1)[0]).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_lr_scheduler_drives_each_group():
    a = make_tiny()
    b = copy.deepcopy(a)
    opt_a = blockopt.AdamMini(a, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.1)
    opt_b = blockopt.AdamMini(b, lr=1e-2)
    data = batches(5)
    for i, idx in enumerate(data):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            lm_loss(model, idx).backward()
        if i and i % 2 == 0:  # what StepLR should do: multiply by gamma every 2 steps
            opt_b.param_groups[0]["lr"] *= 0.1
        opt_a.step()
        opt_b.step()
        sched.step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert max_param_diff(a, b) == 0.0


def test_grad_scaler_skips_inf_steps_and_unscales_finite_ones():
    model = make_tiny(torch.float32)
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, lr=1e-2)
    ref_opt = blockopt.AdamMini(ref, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    idx = batches(1)[0]

    # a step with an inf gradient is skipped: parameters and state untouched
    before = copy.deepcopy(model.state_dict())
    scaler.scale(lm_loss(model, idx)).backward()
    model.embed.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(opt.state) == 0
    assert scaler.get_scale() < 2.0**10

    # a finite step equals the unscaled step
    opt.zero_grad()
    scaler.scale(lm_loss(model, idx)).backward()
    scaler.step(opt)
    scaler.update()
    ref_opt.zero_grad()
    lm_loss(ref, idx).backward()
    ref_opt.step()
    assert max_param_diff(model, ref) < 1e-6
    assert max_param_diff(model, make_tiny(torch.float32)) > 1e-3


def test_torch_compile_of_the_training_step_matches_eager():
    eager_model = make_tiny(torch.float32)
    compiled_model = copy.deepcopy(eager_model)
    eager_opt = blockopt.AdamMini(eager_model, lr=1e-2)
    compiled_opt = blockopt.AdamMini(compiled_model, lr=1e-2)

    @torch.compile(backend="eager")  # dynamo traces our step; eager backend keeps CI fast on CPU
    def compiled_step(idx):
        compiled_opt.zero_grad()
        loss = lm_loss(compiled_model, idx)
        loss.backward()
        compiled_opt.step()
        return loss

    data = batches(3)
    for idx in data:
        compiled_step(idx)
    train(eager_model, eager_opt, data)
    assert max_param_diff(eager_model, compiled_model) < 1e-6
    assert compiled_opt.state[compiled_model.embed.weight]["step"].item() == 3


def test_deepcopy_and_pickle_carry_plan_and_state():
    model = make_tiny()
    opt = blockopt.AdamMini(model, lr=1e-2, value="whole")
    data = batches(6)
    train(model, opt, data[:3])
    for clone_model, clone_opt in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        assert clone_opt.plan == opt.plan
        train(clone_model, clone_opt, data[3:])
        assert clone_opt.state[clone_model.embed.weight]["step"].item() == 6
    train(model, opt, data[3:])
    assert max_param_diff(model, clone_model) == 0.0
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # plain state_dict serialises with stock tools


def test_add_param_group_plans_new_parameters():
    model = make_tiny()
    opt = blockopt.AdamMini(model, lr=1e-2)
    extra = nn.Linear(16, 8)
    opt.add_param_group({"params": list(extra.named_parameters(prefix="extra")), "lr": 1e-3})
    assert opt.plan["extra.weight"].rule == "rows" and opt.plan["extra.bias"].rule == "coordinate"
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    before = extra.weight.detach().clone()
    extra.weight.grad = torch.ones_like(extra.weight)
    opt.step()
    assert not torch.equal(before, extra.weight)
    with pytest.raises(ValueError, match="given twice"):
        opt.add_param_group({"params": [("again.head.weight", model.head.weight)]})
    assert len(opt.param_groups) == 2


def test_unnamed_parameters_work_with_a_warning():
    model = make_tiny()
    with pytest.warns(blockopt.PartitionWarning, match="without names"):
        opt = blockopt.AdamMini(model.parameters(), lr=1e-2)
    train(model, opt, batches(2))
    assert {s.rule for s in opt.plan.values()} == {"rows", "coordinate"}


def test_frozen_parameters_passed_explicitly_are_planned():
    model = make_tiny()
    model.head.weight.requires_grad_(False)
    opt = blockopt.AdamMini(model.named_parameters(), lr=1e-2)
    assert "head.weight" in opt.plan
    model.head.weight.requires_grad_(True)  # progressive unfreezing
    train(model, opt, batches(1))
    assert opt.state[model.head.weight][EXP_AVG_SQ].shape == (VOCAB,)
