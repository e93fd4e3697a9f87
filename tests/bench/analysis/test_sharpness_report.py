"""The sharpness study's report helpers and its measured training run (`blockopt.bench.analysis`).

The per-type values "without layer 0" in benchmarks/studies/sharpness/README.md come from
`gauss_newton_without`, so it is checked against what the meter itself wrote: leaving nothing out
must give back each type's reported value, on every committed report that carries per-tensor
values (which also checks `tensor_sizes` against the model the report was measured on).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blockopt.bench import read_result
from blockopt.bench.analysis import sharpness, sharpness_run
from blockopt.bench.analysis.sharpness_run import SharpnessRun, model_variant

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "studies" / "sharpness" / "results"


def reports_with_tensor_values():
    paths = []
    for path in sorted(RESULTS.glob("*/result.json")):
        checkpoints = read_result(path)["results"]["checkpoints"].values()
        if any("tensor_gauss_newton" in e for c in checkpoints for e in c["types"].values()):
            paths.append(path)
    return paths


REPORTS = reports_with_tensor_values()


def test_there_are_reports_to_check():
    # the sharpness reports from the paper-proportions runs on carry per-tensor values
    assert len(REPORTS) >= 3


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.parent.name)
def test_leaving_nothing_out_gives_back_the_reported_type_values(path):
    report = read_result(path)
    model = report["settings"]["model"]
    sizes = sharpness.tensor_sizes(model)
    assert sum(sizes.values()) == model["n_params"]
    for step, checkpoint in report["results"]["checkpoints"].items():
        types = checkpoint["types"]
        for block_type, entry in types.items():
            assert set(entry["tensor_gauss_newton"]) <= set(sizes), (step, block_type)
        recomputed = sharpness.gauss_newton_without(types, sizes, prefix="no parameter starts with this")
        assert set(recomputed) == set(types)
        for block_type, value in recomputed.items():
            reported = types[block_type]["gauss_newton_per_param"]
            assert value == pytest.approx(reported, rel=1e-9), (step, block_type)


def test_leaving_a_layer_out_weights_the_rest_by_size():
    types = {
        "ffn": {"tensor_gauss_newton": {"layers.0.w": [8.0, 0.1], "layers.1.w": [2.0, 0.1], "layers.1.v": [5.0, 0.1]}},
        "norm": {"tensor_gauss_newton": {"layers.0.n": [1.0, 0.1]}},
        "head": {},  # a report older than the per-tensor field
    }
    sizes = {"layers.0.w": 10, "layers.1.w": 30, "layers.1.v": 10, "layers.0.n": 4}
    values = sharpness.gauss_newton_without(types, sizes, prefix="layers.0.")
    assert values == {"ffn": pytest.approx((30 * 2.0 + 10 * 5.0) / 40)}  # norm has nothing left
    everything = sharpness.gauss_newton_without(types, sizes, prefix="x")
    assert everything["ffn"] == pytest.approx((10 * 8.0 + 30 * 2.0 + 10 * 5.0) / 50)


def test_summary_rows_give_the_paper_pairs_ratios():
    report = read_result(RESULTS / "width512")
    sizes = sharpness.tensor_sizes(report["settings"]["model"])
    checkpoints = report["results"]["checkpoints"]
    table = sharpness.summarize(report).splitlines()
    assert len(table) == 2 + len(checkpoints)
    for line, (step, checkpoint) in zip(table[2:], checkpoints.items()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == step
        values = {t: e["gauss_newton_per_param"] for t, e in checkpoint["types"].items()}
        labels = [sharpness.LABELS[t] for t in sorted(values, key=values.get)]
        assert cells[1] == " < ".join(labels)
        order = sharpness.PAPER_ORDER
        expected = [values[b] / values[a] for a, b in zip(order, order[1:])]
        assert [float(r) for r in cells[2].split(" / ")] == pytest.approx(expected, abs=0.006)
        # the last column leaves out every first-layer tensor: a size-weighted mean of the rest
        kept = {}
        for block_type, entry in checkpoint["types"].items():
            per_tensor = entry["tensor_gauss_newton"].items()
            rest = [(sizes[n], v) for n, (v, _) in per_tensor if not n.startswith("layers.0.")]
            if rest:
                kept[block_type] = sum(m * v for m, v in rest) / sum(m for m, _ in rest)
        expected = [kept[b] / kept[a] for a, b in zip(order, order[1:])]
        assert [float(r) for r in cells[3].split(" / ")] == pytest.approx(expected, abs=0.006)


def test_the_ratios_read_from_a_report_are_its_checkpoints_gauss_newton_values():
    report = read_result(RESULTS / "demo")
    step, last = sharpness.gauss_newton_at(report)
    assert step == 100
    assert last["vo"] == report["results"]["checkpoints"]["100"]["types"]["vo"]["gauss_newton_per_param"]
    assert sharpness.gauss_newton_at(report, checkpoint=0)[0] == 0


def tiny(**changes) -> SharpnessRun:
    """A run of seconds: a 1-layer, 32-wide model, 2 steps, one measure."""
    settings = dict(model=model_variant(vocab=300, dim=32, layers=1), steps=2, checkpoints=(0, 2),
                    measures=("gauss_newton",), gn_samples=2, batch=2)
    return SharpnessRun(**{**settings, **changes})


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "value"]
    lines = (" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(12)) for i in range(3000))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(lines))
    return path


def test_a_passed_in_corpus_is_what_the_run_trains_on_and_records(corpus_file, tmp_path):
    from blockopt.bench import demo_data

    whole = sharpness_run.run(tiny(corpus=corpus_file, max_bytes=1_000_000), tmp_path / "a")
    capped = sharpness_run.run(tiny(corpus=corpus_file, max_bytes=20000), tmp_path / "b")
    _, expected = demo_data(300, corpus_file, max_bytes=None)  # the file is under 1 MB: all of it
    training = whole["settings"]["training"]
    assert training["corpus"] == str(corpus_file) and training["max_bytes"] == 1_000_000
    assert whole["results"]["train_tokens"] == len(expected.train)  # the built-in corpus has far more
    assert capped["settings"]["training"]["max_bytes"] == 20000
    assert capped["results"]["train_tokens"] < whole["results"]["train_tokens"]
    written = read_result(tmp_path / "a")
    assert written["settings"]["training"] == training
    assert written["results"]["train_tokens"] == whole["results"]["train_tokens"]
    assert (tmp_path / "a" / sharpness_run.FIGURE).exists()


@pytest.mark.parametrize(("changes", "name"), [
    ({"max_bytes": 0}, "max_bytes"), ({"max_bytes": -1}, "max_bytes"),
    ({"lr": 0.0}, "lr"), ({"lr": -0.001}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"checkpoints": (0, 3)}, "checkpoints"), ({"measures": ("hessian",)}, "measures[0]"),
])
def test_settings_out_of_range_are_refused_by_name(changes, name):
    with pytest.raises(ValueError, match=rf"^{name.replace('[', '.').replace(']', '.')} must "):
        tiny(**changes)


def test_a_missing_corpus_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt.*does not exist"):
        sharpness_run.run(tiny(corpus=tmp_path / "absent.txt"), tmp_path / "x")


def test_the_run_trains_at_the_lr_it_is_given_and_records_it(corpus_file, tmp_path):
    def weight_change(lr: float) -> tuple[dict, float]:
        report = sharpness_run.run(tiny(corpus=corpus_file, lr=lr), tmp_path / str(lr))
        before, after = (report["results"]["checkpoints"][s]["weight_rms"] for s in ("0", "2"))
        return report, max(abs(after[n] - before[n]) for n in before)

    frozen, tiny_change = weight_change(1e-12)
    moving, change = weight_change(1e-2)
    assert frozen["settings"]["training"]["lr"] == 1e-12 and moving["settings"]["training"]["lr"] == 1e-2
    assert tiny_change < 1e-9 < 1e-5 < change


def test_a_run_stopped_after_a_checkpoint_leaves_a_report_of_what_it_measured(corpus_file, tmp_path, monkeypatch):
    measured = []

    def measure_once(*args, **kwargs):
        if measured:
            raise KeyboardInterrupt  # stopped during the second measurement
        measured.append(True)
        return real(*args, **kwargs)

    real = sharpness_run.block_sharpness
    monkeypatch.setattr(sharpness_run, "block_sharpness", measure_once)
    with pytest.raises(KeyboardInterrupt):
        sharpness_run.run(tiny(corpus=corpus_file), tmp_path / "stopped")
    stopped = read_result(tmp_path / "stopped")
    assert (tmp_path / "stopped" / sharpness_run.FIGURE).exists()
    assert stopped["results"]["complete"] is False and stopped["results"]["val_curve"] is None
    assert list(stopped["results"]["checkpoints"]) == ["0"]
    assert "Stopped early: measured through step 0 of the 2-step schedule" in sharpness.summarize(stopped)

    monkeypatch.setattr(sharpness_run, "block_sharpness", real)
    finished = sharpness_run.run(tiny(corpus=corpus_file), tmp_path / "stopped")
    written = read_result(tmp_path / "stopped")
    assert written["results"]["complete"] is True and finished["results"]["complete"] is True
    assert list(written["results"]["checkpoints"]) == ["0", "2"] and written["results"]["val_curve"]
    # the first checkpoint is the same measurement either way
    assert written["results"]["checkpoints"]["0"]["types"] == stopped["results"]["checkpoints"]["0"]["types"]
    assert "Stopped early" not in sharpness.summarize(written)


def test_the_seed_picks_the_initial_weights_and_is_recorded(corpus_file, tmp_path):
    def initial_rms(seed: int) -> tuple[dict, dict]:
        report = sharpness_run.run(tiny(corpus=corpus_file, seed=seed), tmp_path / str(seed))
        return report, report["results"]["checkpoints"]["0"]["weight_rms"]

    first, rms0 = initial_rms(0)
    again, rms0_again = initial_rms(0)
    other, rms1 = initial_rms(1)
    assert first["settings"]["training"]["seed"] == 0 and other["settings"]["training"]["seed"] == 1
    assert rms0 == rms0_again  # same seed, same weights
    assert any(rms0[n] != rms1[n] for n in rms0)


def test_a_gpt2_variant_has_no_kv_heads_to_change():
    assert model_variant("gpt2", dim=64).dim == 64
    with pytest.raises(ValueError, match="kv_heads"):
        model_variant("gpt2", kv_heads=2)
