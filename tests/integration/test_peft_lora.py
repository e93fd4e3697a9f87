"""The PEFT LoRA recipe (docs/integrations.md): AdamMini(peft_model) plans the LoRA factors with
the role of the layer they adapt, trains only them, and resumes exactly from a checkpoint."""

from __future__ import annotations

import pytest
import torch

import blockopt

from .tiny import Tokens, assert_same_parameters, tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

STEPS, SAVE_AT = 4, 2
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_llama():
    model = tiny_llama()
    torch.manual_seed(1)  # LoRA's A factors
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def train(checkpoint, *, save=False, resume=False):
    """The recipe: steps ``[0, STEPS)``, saving the adapter and optimizer after ``SAVE_AT``, or resuming there."""
    model = lora_llama()
    optimizer = blockopt.AdamMini(model, lr=1e-2, weight_decay=0.1)
    batches = list(torch.utils.data.DataLoader(Tokens(), batch_size=4))
    first = 0
    if resume:
        saved = torch.load(checkpoint, weights_only=True)
        peft.set_peft_model_state_dict(model, saved["adapter"])
        optimizer.load_state_dict(saved["optimizer"])
        first = SAVE_AT
    for step in range(first, STEPS):
        model(**batches[step]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if save and step + 1 == SAVE_AT:
            adapter = peft.get_peft_model_state_dict(model)
            torch.save({"adapter": adapter, "optimizer": optimizer.state_dict()}, checkpoint)
    return model, optimizer


def test_lora_factors_take_the_adapted_layers_role():
    model = lora_llama()
    plan = blockopt.AdamMini(model).plan
    factors = [name for name in plan if ".lora_" in name]
    assert len(factors) == 2 * len(TARGETS) * model.config.num_hidden_layers
    for name in factors:
        adapted = name.split(".lora_")[0] + ".base_layer.weight"
        assert plan[name].role == plan[adapted].role != "other", name
    roles = {plan[name].role for name in factors}
    assert len(roles) == len(TARGETS)  # query, value and the FFN's down projection stay apart


def test_lora_trains_only_the_adapters_and_resumes_exactly(tmp_path):
    model, optimizer = train(tmp_path / "checkpoint.pt", save=True)
    trained = {p for p in optimizer.state if optimizer.state[p]}
    assert trained == {p for p in model.parameters() if p.requires_grad}
    resumed, _ = train(tmp_path / "checkpoint.pt", resume=True)
    assert_same_parameters(model, resumed)
    untouched = lora_llama()
    lora_b = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert any(not torch.equal(model.get_parameter(n), untouched.get_parameter(n)) for n in lora_b)
