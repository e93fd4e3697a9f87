"""The Lightning recipe (docs/integrations.md): ``configure_optimizers`` returns a blockopt
optimizer for the module; checkpoints and resuming are Lightning's own. Lightning is a test dependency, not one of
blockopt: without it this test skips."""

from __future__ import annotations

import pytest
import torch

import blockopt

from .tiny import Tokens, assert_same_parameters, tiny_llama

L = pytest.importorskip("lightning")
pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

EPOCHS = 2  # two steps each; the checkpoint is the end of the first epoch


class CausalLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return blockopt.AdamMini(self.model, lr=1e-3, weight_decay=0.1)


def fit(root, ckpt_path=None):
    module = CausalLM()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1)  # one per epoch
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, callbacks=[checkpoints],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, torch.utils.data.DataLoader(Tokens(), batch_size=8), ckpt_path=ckpt_path)
    return module


def test_lightning_checkpoints_and_resumes_exactly(tmp_path):
    full = fit(tmp_path / "full")
    (first_epoch,) = (tmp_path / "full").glob("epoch=0-*.ckpt")
    resumed = fit(tmp_path / "resumed", ckpt_path=first_epoch)
    assert_same_parameters(full, resumed)
