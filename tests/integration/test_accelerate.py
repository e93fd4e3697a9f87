"""The accelerate recipe (docs/integrations.md): ``prepare``, ``save_state`` / ``load_state``,
and a resumed run equal to the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

import blockopt

from .tiny import Tokens, assert_same_parameters, tiny_llama

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

STEPS, SAVE_AT = 4, 2


def train(checkpoint, *, save=False, resume=False):
    """The recipe: steps ``[0, STEPS)``, saving after ``SAVE_AT`` of them, or resuming from there."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_llama()
    optimizer = blockopt.AdamMini(model, lr=1e-3, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    first = 0
    if resume:
        accelerator.load_state(checkpoint)
        first = SAVE_AT
        loader = accelerator.skip_first_batches(loader, first)  # the batches the saved run already took
    for step, batch in enumerate(loader, start=first):
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if save and step + 1 == SAVE_AT:
            accelerator.save_state(checkpoint)
    assert step + 1 == STEPS
    return accelerator.unwrap_model(model), optimizer


def test_accelerate_saves_and_resumes_exactly(tmp_path):
    model, optimizer = train(tmp_path / "state", save=True)
    assert blockopt.hf.optimizer_metrics(optimizer)["optimizer/blocks"] == blockopt.partition(model).summary().n_blocks
    resumed, _ = train(tmp_path / "state", resume=True)
    assert_same_parameters(model, resumed)
