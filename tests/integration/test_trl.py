"""The TRL recipe (docs/integrations.md): `SFTTrainer` is a `transformers.Trainer`, so blockopt
enters it the Trainer's two ways. Both train, checkpoint and resume exactly; with ``peft_config=``
the factory form plans the LoRA model SFTTrainer builds itself."""

from __future__ import annotations

import pytest
import torch

import blockopt
from blockopt.hf import create_optimizer, optimizer_cls_and_kwargs

from .tiny import VOCAB, Tokens, assert_same_parameters, tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

STEPS = 4


def tokenizer():
    """A word-level tokenizer over the tiny vocabulary, built locally (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="t0", pad_token="t0", unk_token="t1")


def dataset():
    """The Tokens sequences, pre-tokenized (SFTTrainer then skips its own tokenizing)."""
    rows = [Tokens()[i]["input_ids"].tolist() for i in range(len(Tokens()))]
    return datasets.Dataset.from_dict({"input_ids": rows})


def sft_config(root, **overrides):
    settings = dict(output_dir=str(root), max_steps=STEPS, per_device_train_batch_size=4, report_to=[],
                    save_strategy="steps", save_steps=2, use_cpu=True, seed=0, disable_tqdm=True,
                    lr_scheduler_type="constant", learning_rate=1e-3, weight_decay=0.1)
    return trl.SFTConfig(**{**settings, **overrides})


def full_model_trainer(root):
    model = tiny_llama()
    args = sft_config(root)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer(),
                             optimizers=(create_optimizer(model, args), None))
    return trainer, model


def test_sft_trainer_trains_and_resumes_exactly(tmp_path):
    full, model = full_model_trainer(tmp_path / "full")
    full.train()
    optimizer = full.optimizer.optimizer  # accelerate's wrapper
    assert type(optimizer) is blockopt.AdamMini
    assert optimizer.plan == blockopt.partition(model)
    assert int(optimizer.state[model.lm_head.weight]["step"]) == STEPS

    resumed, model2 = full_model_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert_same_parameters(model, model2)


def lora_trainer(root):
    peft = pytest.importorskip("peft")
    args = sft_config(root)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=dataset(), processing_class=tokenizer(),
                             peft_config=config, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args))
    return trainer


def test_sft_trainer_with_peft_config_plans_the_lora_model(tmp_path):
    full = lora_trainer(tmp_path / "full")
    full.train()
    optimizer = full.optimizer.optimizer
    trainable = {name for name, p in full.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    stepped = {name for name, p in full.model.named_parameters() if p in optimizer.state}
    assert stepped == trainable  # the LoRA factors SFTTrainer made, nothing of the frozen base
    # every LoRA factor is planned from the module (rows of A and B), not from bare shapes
    assert {optimizer.plan[name].rule for name in trainable} <= {"rows", "cols", "whole"}
    lora_b = [p for name, p in full.model.named_parameters() if "lora_B" in name]
    assert all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: it moved, so the steps ran

    resumed = lora_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
