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
