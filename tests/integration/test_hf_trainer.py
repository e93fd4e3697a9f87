"""blockopt optimizers inside transformers' Trainer: training, checkpoints and resuming."""

from __future__ import annotations

import pytest
import torch

import blockopt

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.hf

STEPS = 4


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        x = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def trainer(tmp_path, **overrides):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = blockopt.AdamMini(model, lr=1e-3, weight_decay=0.1)
    settings = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, report_to=[],
                    save_strategy="steps", save_steps=2, use_cpu=True, seed=0, disable_tqdm=True,
                    lr_scheduler_type="constant")
    settings.update(overrides)
    args = transformers.TrainingArguments(**settings)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, None)), model, optimizer


def test_trainer_runs_and_resumes_exactly(tmp_path):
    full, model, optimizer = trainer(tmp_path / "full")
    full.train()
    assert int(optimizer.state[model.lm_head.weight]["step"]) == STEPS
    # the Trainer saved the optimizer at step 2 through state_dict(): block statistics included
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert any(v["exp_avg_sq"].numel() < v["exp_avg"].numel() for v in saved["state"].values())

    resumed, model2, optimizer2 = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
