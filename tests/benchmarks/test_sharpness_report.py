"""The helpers that `benchmarks/sharpness.py --summarize` builds its tables from.

The per-type values in `benchmarks/blockwise_lr.md` "without layer 0" come from
`gauss_newton_without`, so it is checked against what the meter itself wrote: leaving nothing out
must give back each type's reported value, on every committed report that carries per-tensor
values (which also checks `tensor_sizes` against the model the report was measured on).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("sharpness_script", BENCHMARKS / "sharpness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reports_with_tensor_values():
    paths = []
    for path in sorted(BENCHMARKS.glob("sharpness*.json")):
        checkpoints = json.loads(path.read_text())["checkpoints"].values()
        if any("tensor_gauss_newton" in e for c in checkpoints for e in c["types"].values()):
            paths.append(path)
    return paths


REPORTS = reports_with_tensor_values()


def test_there_are_reports_to_check():
    # the sharpness reports from the paper-proportions runs on carry per-tensor values
    assert len(REPORTS) >= 3


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.stem)
def test_leaving_nothing_out_gives_back_the_reported_type_values(script, path):
    report = json.loads(path.read_text())
    sizes = script.tensor_sizes(report["model"])
    assert sum(sizes.values()) == report["model"]["n_params"]
    for step, checkpoint in report["checkpoints"].items():
        types = checkpoint["types"]
        for block_type, entry in types.items():
            assert set(entry["tensor_gauss_newton"]) <= set(sizes), (step, block_type)
        recomputed = script.gauss_newton_without(types, sizes, prefix="no parameter starts with this")
        assert set(recomputed) == set(types)
        for block_type, value in recomputed.items():
            reported = types[block_type]["gauss_newton_per_param"]
            assert value == pytest.approx(reported, rel=1e-9), (step, block_type)


def test_leaving_a_layer_out_weights_the_rest_by_size(script):
    types = {
        "ffn": {"tensor_gauss_newton": {"layers.0.w": [8.0, 0.1], "layers.1.w": [2.0, 0.1], "layers.1.v": [5.0, 0.1]}},
        "norm": {"tensor_gauss_newton": {"layers.0.n": [1.0, 0.1]}},
        "head": {},  # a report older than the per-tensor field
    }
    sizes = {"layers.0.w": 10, "layers.1.w": 30, "layers.1.v": 10, "layers.0.n": 4}
    values = script.gauss_newton_without(types, sizes, prefix="layers.0.")
    assert values == {"ffn": pytest.approx((30 * 2.0 + 10 * 5.0) / 40)}  # norm has nothing left
    everything = script.gauss_newton_without(types, sizes, prefix="x")
    assert everything["ffn"] == pytest.approx((10 * 8.0 + 30 * 2.0 + 10 * 5.0) / 50)


def test_summary_rows_give_the_paper_pairs_ratios(script):
    path = BENCHMARKS / "sharpness_width512_vocab16k.json"
    report = json.loads(path.read_text())
    sizes = script.tensor_sizes(report["model"])
    table = script.summarize(report).splitlines()
    assert len(table) == 2 + len(report["checkpoints"])
    for line, (step, checkpoint) in zip(table[2:], report["checkpoints"].items()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == step
        values = {t: e["gauss_newton_per_param"] for t, e in checkpoint["types"].items()}
        labels = [script.LABELS[t] for t in sorted(values, key=values.get)]
        assert cells[1] == " < ".join(labels)
        order = script.PAPER_ORDER
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


TINY_RUN = ["--vocab", "300", "--dim", "32", "--layers", "1", "--steps", "2", "--checkpoints", "0,2",
            "--measures", "gauss_newton", "--gn-samples", "2", "--batch", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "value"]
    lines = (" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(12)) for i in range(3000))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(lines))
    return path


def test_a_passed_in_corpus_is_what_the_run_trains_on_and_records(script, corpus_file, tmp_path):
    from blockopt.bench.demo import demo_data

    whole = script.main([*TINY_RUN, "--corpus", str(corpus_file), "--max-bytes", "1000000",
                         "--out", str(tmp_path / "a")])
    capped = script.main([*TINY_RUN, "--corpus", str(corpus_file), "--max-bytes", "20000",
                          "--out", str(tmp_path / "b")])
    _, expected = demo_data(300, corpus_file, max_bytes=None)  # the file is under 1 MB: all of it
    assert whole["training"]["corpus"] == str(corpus_file) and whole["training"]["max_bytes"] == 1_000_000
    assert whole["training"]["train_tokens"] == len(expected.train)  # the built-in corpus has far more
    assert capped["training"]["max_bytes"] == 20000
    assert capped["training"]["train_tokens"] < whole["training"]["train_tokens"]
    written = json.loads((tmp_path / "a.json").read_text())["training"]
    assert {k: written[k] for k in ("corpus", "max_bytes", "train_tokens")} == {
        k: whole["training"][k] for k in ("corpus", "max_bytes", "train_tokens")}


@pytest.mark.parametrize("cap", ["0", "-1"])
def test_a_cap_below_one_byte_is_refused_by_name(script, capsys, tmp_path, cap):
    with pytest.raises(SystemExit):
        script.main([*TINY_RUN, "--max-bytes", cap, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "--max-bytes" in err and "positive integer" in err


def test_a_missing_corpus_is_refused_by_name(script, capsys, tmp_path):
    with pytest.raises(SystemExit):
        script.main([*TINY_RUN, "--corpus", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "--corpus" in err and "absent.txt" in err and "does not exist" in err


def test_the_run_trains_at_the_lr_it_is_given_and_records_it(script, corpus_file, tmp_path):
    def weight_change(lr: str) -> tuple[dict, float]:
        report = script.main([*TINY_RUN, "--corpus", str(corpus_file), "--lr", lr, "--out", str(tmp_path / lr)])
        before, after = (report["checkpoints"][s]["weight_rms"] for s in ("0", "2"))
        return report, max(abs(after[n] - before[n]) for n in before)

    frozen, tiny_change = weight_change("1e-12")
    moving, change = weight_change("1e-2")
    assert frozen["training"]["lr"] == 1e-12 and moving["training"]["lr"] == 1e-2
    assert tiny_change < 1e-9 < 1e-5 < change


@pytest.mark.parametrize("lr", ["0", "-0.001", "nan"])
def test_a_non_positive_lr_is_refused_by_name(script, capsys, tmp_path, lr):
    with pytest.raises(SystemExit):
        script.main([*TINY_RUN, "--lr", lr, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "--lr" in err and "positive" in err


def test_a_run_stopped_after_a_checkpoint_leaves_a_report_of_what_it_measured(script, corpus_file, tmp_path,
                                                                                monkeypatch):
    measured = []

    def measure_once(*args, **kwargs):
        if measured:
            raise KeyboardInterrupt  # stopped during the second measurement
        measured.append(True)
        return real(*args, **kwargs)

    real = script.block_sharpness
    monkeypatch.setattr(script, "block_sharpness", measure_once)
    with pytest.raises(KeyboardInterrupt):
        script.main([*TINY_RUN, "--corpus", str(corpus_file), "--out", str(tmp_path / "stopped")])
    stopped = json.loads((tmp_path / "stopped.json").read_text())
    assert (tmp_path / "stopped.png").exists()
    assert stopped["complete"] is False and stopped["training"]["val_curve"] is None
    assert list(stopped["checkpoints"]) == ["0"]
    assert "Stopped early: measured through step 0 of the 2-step schedule" in script.summarize(stopped)

    monkeypatch.setattr(script, "block_sharpness", real)
    finished = script.main([*TINY_RUN, "--corpus", str(corpus_file), "--out", str(tmp_path / "stopped")])
    written = json.loads((tmp_path / "stopped.json").read_text())
    assert written["complete"] is True and finished["complete"] is True
    assert list(written["checkpoints"]) == ["0", "2"] and written["training"]["val_curve"]
    # the first checkpoint is the same measurement either way
    assert written["checkpoints"]["0"]["types"] == stopped["checkpoints"]["0"]["types"]
    assert "Stopped early" not in script.summarize(written)


def test_the_seed_picks_the_initial_weights_and_is_recorded(script, corpus_file, tmp_path):
    def initial_rms(seed: str) -> tuple[dict, dict]:
        report = script.main([*TINY_RUN, "--corpus", str(corpus_file), "--seed", seed, "--out", str(tmp_path / seed)])
        return report, report["checkpoints"]["0"]["weight_rms"]

    first, rms0 = initial_rms("0")
    again, rms0_again = initial_rms("0")
    other, rms1 = initial_rms("1")
    assert first["training"]["seed"] == 0 and other["training"]["seed"] == 1
    assert rms0 == rms0_again  # same seed, same weights
    assert any(rms0[n] != rms1[n] for n in rms0)
