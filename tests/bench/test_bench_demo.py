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
    assert saved["hyperparameters"]["eval_every"] == 2 and saved["hyperparameters"]["warmup_steps"] == 1
    assert saved["corpus"]["source"] == str(corpus_file) and not saved["corpus"]["tokenizer_from_cache"]
    assert saved["versions"]["blockopt"] == blockopt.__version__ and saved["versions"]["torch"]
    assert saved["machine"]["platform"]
    assert set(saved["timings_s"]) >= {"tokenizer", "run_AdamW", "run_Adam-mini", "total"}


class Stop(Exception):
    pass


def test_the_demo_is_a_compare_of_two_optimizers_at_the_default_loop(monkeypatch, tmp_path):
    """The demo's settings are `compare`'s defaults (the demo loop: a 20% warm-up, eval every
    tenth of the run, batches of 32 x 128, LR 2e-3) with AdamW and Adam-mini on one seed."""
    from blockopt.bench import demo
    from blockopt.bench.loop import TrainConfig

    seen = {}

    def fake_compare(*, config, **kwargs):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(demo, "compare", fake_compare)
    with pytest.raises(Stop):
        run_demo(out_dir=tmp_path, steps=50, seed=3)
    config = seen["config"]
    assert config.labels == ("AdamW", "Adam-mini") and [s.name for s in config.specs] == ["adamw", "adam-mini"]
    assert config.seeds == (3,) and config.model == demo.DEMO_CONFIG == "demo" and config.lr == demo.DEFAULT_LR == 2e-3
    assert config.loop == TrainConfig(steps=50)
    loop = config.loop.resolved(CONFIGS["demo"].max_seq_len)
    assert (loop.warmup_steps, loop.eval_every, loop.batch_size, loop.seq_len) == (10, 5, 32, 128)
    assert (loop.min_lr_ratio, loop.grad_clip, loop.eval_batches, loop.schedule) == (0.1, 1.0, 4, "cosine")
