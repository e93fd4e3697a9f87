"""A short `run_demo` end to end: the printed comparison, demo.json and the loss plot."""

import json

import pytest

import blockopt
from blockopt.bench.corpus import load_corpus
from blockopt.bench.demo import run_demo
from blockopt.bench.models import CONFIGS

STEPS = 4


@pytest.fixture
def corpus_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKOPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(load_corpus(max_bytes=40_000))
    return path


def test_demo_smoke(corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    report = run_demo(
        corpus_file, steps=STEPS, out_dir=out, batch_size=4, seq_len=32, eval_every=2, eval_batches=1, progress=False
    )
    printed = capsys.readouterr().out
    assert "Adam-mini / AdamW state memory:" in printed and "val loss difference:" in printed
    assert "| final val loss |" in printed

    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    saved = json.loads((out / "demo.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["runs"]) == {"AdamW", "Adam-mini"}
    for run in saved["runs"].values():
        assert len(run["train_curve"]) == STEPS and [s for s, _ in run["val_curve"]] == [2, 4]
        for key in ("final_train_loss", "final_val_loss", "step_ms", "tokens_per_s", "state_bytes", "n_params"):
            assert run[key] > 0
    adamw, mini = saved["runs"]["AdamW"], saved["runs"]["Adam-mini"]
    # Same seed and batches: both runs start from the same loss.
    assert adamw["train_curve"][0] == mini["train_curve"][0]
    assert saved["comparison"]["state_memory_ratio"] == pytest.approx(mini["state_bytes"] / adamw["state_bytes"])
    assert 0.4 < saved["comparison"]["state_memory_ratio"] < 0.6
    assert saved["model"]["n_params"] == adamw["n_params"] and saved["model"]["dim"] == CONFIGS["demo"].dim
    assert saved["hyperparameters"]["steps"] == STEPS and saved["hyperparameters"]["lr"] > 0
    assert saved["corpus"]["source"] == str(corpus_file) and not saved["corpus"]["tokenizer_from_cache"]
    assert saved["versions"]["blockopt"] == blockopt.__version__ and saved["versions"]["torch"]
    assert saved["machine"]["platform"]
    assert set(saved["timings_s"]) >= {"tokenizer", "run_AdamW", "run_Adam-mini", "total"}


def test_demo_loop_is_the_demos_own_schedule():
    """The benchmarks train with `demo_loop`; it must stay what `run_demo` uses by default."""
    import inspect

    from blockopt.bench.demo import DEFAULT_STEPS, demo_loop, run_demo

    loop = demo_loop()
    defaults = {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}
    for key in ("steps", "batch_size", "seq_len", "min_lr_ratio", "grad_clip", "eval_batches", "seed"):
        assert loop[key] == defaults[key], key
    assert loop["warmup_steps"] == DEFAULT_STEPS // 5 and loop["eval_every"] == DEFAULT_STEPS // 10
    short = demo_loop(7, eval_every=1, seed=3)
    assert (short["steps"], short["warmup_steps"], short["eval_every"], short["seed"]) == (7, 1, 1, 3)
