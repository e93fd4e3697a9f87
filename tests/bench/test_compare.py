"""`blockopt.bench.compare` and `blockopt compare`: results, files, reproducibility, resume, errors."""

import csv
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from blockopt import cli
from blockopt.bench import CompareResult, compare
from blockopt.bench.compare_config import CompareConfig
from blockopt.bench.loop import TrainConfig
from blockopt.bench.corpus import load_corpus
from blockopt.bench.modelspec import ModelSpec, ModelSpecError
from blockopt.bench.peers import PeerError
from blockopt.bench.schedules import lr_factor

TINY = dict(model="llama-tiny", steps=6, batch_size=4, seq_len=32, eval_every=3, eval_batches=1, max_bytes=40_000)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BLOCKOPT_CACHE", str(tmp_path_factory.getbasetemp() / "compare-cache"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny comparison written to disk, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("compare") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test single_thread
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("BLOCKOPT_CACHE", str(tmp_path_factory.getbasetemp() / "compare-cache"))
            result = compare(["adamw", "adam-mini"], seeds=(0, 1), out_dir=out, progress=False, **TINY)
    finally:
        torch.set_num_threads(threads)
    return result, out


def curves(result):
    return {(r.label, r.seed): (r.result.train_curve, r.result.val_curve) for r in result.runs}


def test_default_settings_are_the_measured_default_run():
    config = CompareConfig()
    assert config.labels == ("adamw", "adam-mini") and config.model == "demo" and config.seeds == (0, 1, 2)
    assert config.loop == TrainConfig() and config.loop.steps == 100 and config.baseline_label == "adamw"
    loop = config.loop.resolved(max_seq_len=128)
    assert (loop.warmup_steps, loop.eval_every, loop.seq_len) == (20, 10, 128)
    assert config.loop.resolved(max_seq_len=64).seq_len == 64  # the derived length fits the model


def test_settings_take_the_loops_fields_flat():
    config = CompareConfig().replace(steps=10, lr=1e-3, schedule="wsd")
    assert config.loop == TrainConfig(steps=10, schedule="wsd") and config.lr == 1e-3
    assert config.to_dict()["steps"] == 10 and CompareConfig().replace(**config.to_dict()) == config
    with pytest.raises(ValueError, match="lr must be a number > 0, got 0"):
        config.replace(lr=0)
    with pytest.raises(TypeError, match="loop must be a TrainConfig"):
        CompareConfig(loop={"steps": 10})


def test_result_summary_and_comparison(saved):
    result, _ = saved
    assert [(r.label, r.seed) for r in result.runs] == [("adamw", 0), ("adam-mini", 0), ("adamw", 1), ("adam-mini", 1)]
    for record in result.runs:
        assert [s for s, _ in record.result.train_curve] == list(range(1, 7))
        assert [s for s, _ in record.result.val_curve] == [3, 6]
        assert record.status == "trained"
    # Same seed: same init and first batch whatever the optimizer.
    runs = {(r.label, r.seed): r.result for r in result.runs}
    assert runs["adamw", 0].train_curve[0] == runs["adam-mini", 0].train_curve[0]
    assert runs["adamw", 0].train_curve[0] != runs["adamw", 1].train_curve[0]

    summary = result.summary()
    finals = [runs["adam-mini", s].final_val_loss for s in (0, 1)]
    assert summary["adam-mini"]["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert summary["adam-mini"]["final_val_loss"]["std"] == pytest.approx(statistics.stdev(finals))
    assert summary["adam-mini"]["final_val_loss"]["values"] == finals and summary["adam-mini"]["seeds"] == [0, 1]
    base = [runs["adamw", s].final_val_loss for s in (0, 1)]
    cmp = result.comparison()
    assert cmp["adam-mini"]["val_loss_rel_diff"] == pytest.approx(statistics.fmean(finals) / statistics.fmean(base) - 1)
    assert cmp["adam-mini"]["val_loss_rel_diff_per_seed"]["values"] == pytest.approx([m / a - 1 for m, a in zip(finals, base)])
    assert cmp["adamw"]["val_loss_rel_diff"] == 0.0 and cmp["adamw"]["state_bytes_ratio"] == 1.0
    assert 0.45 < cmp["adam-mini"]["state_bytes_ratio"] < 0.55

    # Steps to the baseline's final loss, per seed, against a plain scan of the curves.
    for label in ("adamw", "adam-mini"):
        expected = []
        for seed in (0, 1):
            target = runs["adamw", seed].final_val_loss
            hits = [step for step, loss in runs[label, seed].val_curve if loss <= target]
            expected.append(hits[0] if hits else None)
        assert cmp[label]["steps_to_baseline_loss"] == expected
    assert cmp["adamw"]["steps_to_baseline_loss"][0] is not None  # the baseline reaches its own final loss

    table = result.table()
    assert "final val loss" in table and "vs adamw" in table and "±" in table
    assert max(map(len, table.splitlines())) <= 100  # details are in the JSON and the verdicts
    assert table.splitlines()[2].startswith("adamw ") and table.splitlines()[3].startswith("adam-mini ")
    assert any("adam-mini: final val loss" in line and "state memory" in line for line in result.verdicts())


def _record(label, seed, val_curve):
    from blockopt.bench import RunRecord, RunResult

    result = RunResult(
        optimizer=label, train_curve=[(s, 9.0) for s, _ in val_curve], val_curve=val_curve,
        final_train_loss=9.0, final_val_loss=val_curve[-1][1], step_ms=1.0, tokens_per_s=1.0,
        state_bytes=8, n_params=1, wall_s=1.0,
    )
    return RunRecord(label, seed, result)


def test_steps_to_the_baseline_loss_reads_each_seed_against_its_own_baseline():
    base = {0: [(5, 3.0), (10, 2.0)], 1: [(5, 3.5), (10, 2.5)], 2: [(5, 3.2), (10, 2.2)]}
    fast = {0: [(5, 2.0), (10, 1.5)], 1: [(5, 2.6), (10, 2.4)], 2: [(5, 2.4), (10, 2.3)]}
    runs = [_record("adamw", s, c) for s, c in base.items()] + [_record("adam-mini", s, c) for s, c in fast.items()]
    result = CompareResult(
        config=CompareConfig(optimizers=("adamw", "adam-mini"), seeds=(0, 1, 2), loop=TrainConfig(steps=10)), model={}, corpus={},
        optimizers={"adamw": {}, "adam-mini": {}}, runs=runs,
    )
    cmp = result.comparison()
    # seed 0: 2.0 <= 2.0 at step 5; seed 1: 2.4 <= 2.5 only at step 10; seed 2: 2.3 > 2.2, never
    assert cmp["adam-mini"]["steps_to_baseline_loss"] == [5, 10, None]
    assert cmp["adam-mini"]["steps_to_baseline_loss_fraction"]["values"] == [0.5, 1.0]
    assert cmp["adamw"]["steps_to_baseline_loss"] == [10, 10, 10]
    verdict = next(line for line in result.verdicts() if line.startswith("adam-mini"))
    assert "reaches adamw's final val loss in 0.75x (2/3 seeds)" in verdict and "5 / 10 / never of 10" in verdict
    slow = [_record("adamw", s, c) for s, c in base.items()] + [_record("adam-mini", s, [(10, 9.0)]) for s in base]
    result = CompareResult(config=result.config, model={}, corpus={}, optimizers=result.optimizers, runs=slow)
    assert result.comparison()["adam-mini"]["steps_to_baseline_loss_fraction"] is None
    assert "never reaches adamw's final val loss;" in result.verdicts()[0]


def test_one_seed_prints_plain_values_in_a_table_of_100_columns():
    labels = ("adamw", "adam-mini", "sgd-sai:lr=1e-2,momentum=0.8")
    runs = [_record(label, 3, [(5, 3.0), (10, 2.0 - i / 7)]) for i, label in enumerate(labels)]
    result = CompareResult(
        config=CompareConfig(optimizers=labels, seeds=(3,), loop=TrainConfig(steps=10)), model={}, corpus={},
        optimizers={label: {} for label in labels}, runs=runs,
    )
    table, verdicts = result.table(), result.verdicts()
    assert "±" not in table and " 1.8571 " in table and max(map(len, table.splitlines())) <= 100
    assert table.splitlines()[0].split(" | ") == ["optimizer".ljust(len(labels[2])), "final val loss", "vs adamw",
                                                 "state MiB", "step ms", "tokens/s"]
    assert not any("±" in line or "mean over" in line for line in verdicts)
    assert "(seed 3)" in verdicts[0] and "(10 of 10)" in verdicts[0]


def test_files_and_json_schema(saved):
    result, out = saved
    for name in ("loss_curves.png", "memory.png", "throughput.png", "pareto.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    report = json.loads((out / "compare.json").read_text())
    # one-time costs (kernel build, first-step allocation) measured before the runs, apart
    assert set(report["timings_s"]["first_step"]) == {"adamw", "adam-mini"} and "kernel_build" in report["timings_s"]
    assert report == json.loads(json.dumps(result.to_dict()))
    assert report["schema"] == "blockopt.compare/1" and report["baseline"] == "adamw"
    assert report["settings"]["steps"] == 6 and report["settings"]["seeds"] == [0, 1]
    assert report["model"]["source"] == "llama-tiny" and report["model"]["config"]["arch"] == "llama"
    assert report["model"]["n_params"] == result.runs[0].result.n_params
    assert report["corpus"]["vocab_size"] == 512 and report["corpus"]["tokens"] > 0
    adamw = report["optimizers"]["adamw"]
    assert adamw["hyperparameters"]["lr"] == 2e-3 and adamw["hyperparameters"]["betas"] == [0.9, 0.95]
    assert adamw["class"] == "torch.optim.adamw.AdamW"
    assert report["optimizers"]["adam-mini"]["class"].endswith("AdamMini")
    assert len(report["runs"]) == 4
    run = report["runs"][1]
    assert run["optimizer"] == "adam-mini" and run["seed"] == 0 and len(run["train_curve"]) == 6
    for key in ("final_val_loss", "final_train_loss", "state_bytes", "tokens_per_s", "step_ms", "n_params", "wall_s"):
        assert run[key] > 0
    assert set(report["summary"]["adamw"]) >= {"final_val_loss", "state_bytes", "tokens_per_s", "step_ms"}
    assert report["versions"]["torch"] and report["machine"]["cpu_count"] >= 1
    assert report["timings_s"]["process_cpu"] > 0 and report["loop"]["seq_len"] == 32
    # A saved comparison loads back to the same report and table (to re-plot it, e.g.).
    loaded = CompareResult.load(out)
    assert json.loads(json.dumps(loaded.to_dict())) == report and loaded.table() == result.table()
    # Finished runs keep their result, not their checkpoint.
    assert (out / "runs" / "adam-mini-seed1" / "result.json").is_file()
    assert not (out / "runs" / "adam-mini-seed1" / "checkpoint.pt").exists()


def test_same_seeds_give_bit_identical_curves(saved):
    result, _ = saved
    again = compare(["adamw", "adam-mini"], seeds=(0, 1), progress=False, **TINY)
    assert curves(again) == curves(result)


class Interrupt(Exception):
    pass


def test_each_seed_gives_an_optimizers_own_randomness_its_seed(monkeypatch):
    """blockopt's optimizers take a ``seed`` (rounding bits, AdaPM's initial factors): each run
    builds them with the run's seed, so the spread over seeds includes that randomness, unless the
    spec sets one; optimizers without a ``seed`` get none."""
    import blockopt

    built = []
    for cls in (blockopt.AdamMini, blockopt.AdaPM):
        init = cls.__init__

        def recording(self, *args, __init=init, __cls=cls, **kwargs):
            __init(self, *args, **kwargs)
            built.append((__cls.__name__, kwargs.get("momentum_dtype"), self.seed))

        monkeypatch.setattr(cls, "__init__", recording)
    settings = {**TINY, "steps": 1, "eval_every": 1}
    result = compare(["adamw", "adam-mini:momentum_dtype=int8", "adapm", "adapm:seed=7"], seeds=(3, 4), progress=False,
                     **settings)
    # (each spec is first built once on a probe model, before any run: bad settings fail early)
    assert built[-6:] == [("AdamMini", "int8", 3), ("AdaPM", None, 3), ("AdaPM", None, 7),
                          ("AdamMini", "int8", 4), ("AdaPM", None, 4), ("AdaPM", None, 7)], built
    # the recorded settings stay the spec's (the seed is the run's own)
    optimizers = result.to_dict()["optimizers"]
    assert "seed" not in optimizers["adapm"]["hyperparameters"] and optimizers["adapm:seed=7"]["hyperparameters"]["seed"] == 7


def test_an_interrupted_comparison_resumes_to_the_same_numbers(saved, tmp_path):
    result, _ = saved

    def kill(label, seed, step, loss):
        if (label, seed, step) == ("adam-mini", 0, 5):  # after its step-3 checkpoint
            raise Interrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        compare(["adamw", "adam-mini"], seeds=(0, 1), out_dir=out, progress=False, callback=kill, **TINY)
    resumed = compare(["adamw", "adam-mini"], seeds=(0, 1), out_dir=out, resume=True, progress=False, **TINY)
    assert [r.status for r in resumed.runs] == ["loaded", "resumed", "trained", "trained"]
    assert resumed.runs[1].result.resumed_from == [3]
    assert curves(resumed) == curves(result)

    # A finished comparison resumes without training anything.
    again = compare(["adamw", "adam-mini"], seeds=(0, 1), out_dir=out, resume=True, progress=False,
                    callback=lambda *a: pytest.fail("trained again"), **TINY)
    assert {r.status for r in again.runs} == {"loaded"} and curves(again) == curves(result)

    with pytest.raises(ValueError, match="different settings"):
        compare(["adamw", "adam-mini"], seeds=(0, 1), out_dir=out, resume=True, progress=False, lr=1e-3, **TINY)


def test_a_diverged_run_is_saved_and_loaded_back_as_nan(tmp_path):
    # JSON has no NaN: a diverged run's losses are written as null and must come back as NaN, both
    # when --resume loads the run and when the finished comparison is loaded from compare.json.
    out = tmp_path / "out"
    labels = ["adamw", "adamw:lr=1e9"]
    first = compare(labels, seeds=(0,), out_dir=out, progress=False, **TINY)
    diverged = first.runs[1].result
    assert math.isnan(diverged.final_val_loss) and any(math.isnan(loss) for _, loss in diverged.val_curve)
    assert math.isfinite(first.runs[0].result.final_val_loss)
    assert json.loads((out / "runs" / "adamw_lr_1e9-seed0" / "result.json").read_text())["result"]["final_val_loss"] is None

    again = compare(labels, seeds=(0,), out_dir=out, resume=True, progress=False,
                    callback=lambda *a: pytest.fail("trained again"), **TINY)
    assert [r.status for r in again.runs] == ["loaded", "loaded"]
    for result in (again, CompareResult.load(out)):
        loaded = result.runs[1].result
        assert math.isnan(loaded.final_val_loss) and math.isnan(loaded.final_train_loss)
        assert [math.isnan(loss) for _, loss in loaded.val_curve] == [math.isnan(loss) for _, loss in diverged.val_curve]
        assert result.runs[0].result == first.runs[0].result


def test_bad_names_and_settings_fail_before_training(tmp_path):
    def no_training(*args):
        pytest.fail("trained")

    with pytest.raises(PeerError, match="unknown optimizer 'adamz'"):
        compare(["adamw", "adamz"], callback=no_training, **TINY)
    with pytest.raises(PeerError, match="takes no hyperparameter 'momentum'"):
        compare(["adamw:momentum=0.9"], callback=no_training, **TINY)
    with pytest.raises(PeerError, match=r"bad override in 'adam-mini:betas=0.9,1.5': betas\[1\] must be a number in \[0, 1\)"):
        compare(["adam-mini:betas=0.9,1.5"], callback=no_training, **TINY)
    with pytest.raises(PeerError, match="could not be built"):  # a range only torch's AdamW knows
        compare(["adamw:lr=-1"], callback=no_training, **TINY)
    with pytest.raises(ValueError, match="listed twice"):
        compare(["adamw", "adamw"], **TINY)
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*32\), got \[4294967296\]"):  # an optimizer's seed
        compare(["adam-mini:momentum_dtype=int8"], seeds=(0, 2**32), callback=no_training, **TINY)
    with pytest.raises(ValueError, match="exceeds the model's maximum sequence length 64"):
        compare(["adamw"], **{**TINY, "seq_len": 128})
    with pytest.raises(TypeError, match="unknown compare setting 'stepz'"):
        compare(["adamw"], stepz=3)
    with pytest.raises(ModelSpecError, match="has no field 'n_layerz'"):
        compare(["adamw"], model_overrides={"n_layerz": 1}, **TINY)


def test_built_in_model_overrides_rederive_dependent_fields():
    spec = ModelSpec.parse("demo", {"dim": 64, "n_layers": 1})
    assert spec.config.dim == 64 and spec.config.mlp_hidden == 192  # 8/3 * 64, rounded up to 32
    assert spec.config.n_kv_heads == 2  # set explicitly in "demo": kept
    with pytest.raises(ModelSpecError, match="unknown model 'gpt5'"):
        ModelSpec.parse("gpt5")


@pytest.mark.hf
@pytest.mark.parametrize(
    "source, overrides",
    [
        ("hf:gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 512, "n_positions": 64}),
        ("hf:llama", {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "intermediate_size": 64, "vocab_size": 512, "max_position_embeddings": 64}),
    ],
)
def test_hugging_face_models_train_in_a_comparison(source, overrides):
    pytest.importorskip("transformers")
    result = compare(
        ["adamw", "adam-mini", "adam-mini-official"], model_overrides=overrides, seeds=(0,),
        progress=False, **{**TINY, "model": source, "steps": 2, "eval_every": 1},
    )
    assert result.model["family"] == "hf" and result.model["config"]["vocab_size"] == 512
    first = {r.label: r.result.train_curve[0] for r in result.runs}
    assert len(set(first.values())) == 1  # same init and batch for every optimizer
    for record in result.runs:
        assert len(record.result.val_curve) == 2 and record.result.final_val_loss < 7.0
    assert result.comparison()["adam-mini"]["state_bytes_ratio"] < 0.6


@pytest.mark.hf
def test_hf_config_json_path_and_bad_fields(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}))
    spec = ModelSpec.parse(str(path), {"num_hidden_layers": 2})
    assert spec.family == "hf" and spec.config.num_hidden_layers == 2 and spec.vocab_size == 128
    model = spec.build(seed=0)
    assert model.num_params() == spec.n_params()
    with pytest.raises(ModelSpecError, match="has no field 'n_layerz'"):
        ModelSpec.parse("hf:gpt2", {"n_layerz": 2})
    with pytest.raises(ModelSpecError, match="'gpt7' is neither a named config"):
        ModelSpec.parse("hf:gpt7")


def test_per_step_metrics_are_written_as_csv(saved):
    result, out = saved
    with open(out / "steps.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["label", "seed", "step", "train_loss", "val_loss", "lr"]
    assert len(rows) == 4 * 6 and [(r["label"], r["seed"]) for r in rows[::6]] == [
        ("adamw", "0"), ("adam-mini", "0"), ("adamw", "1"), ("adam-mini", "1")]
    run = next(r.result for r in result.runs if (r.label, r.seed) == ("adam-mini", 1))
    mine = [r for r in rows if (r["label"], r["seed"]) == ("adam-mini", "1")]
    assert [float(r["train_loss"]) for r in mine] == [loss for _, loss in run.train_curve]
    assert [(int(r["step"]), float(r["val_loss"])) for r in mine if r["val_loss"]] == run.val_curve
    # the LR each step ran at: the same LambdaLR schedule as the loop (warm-up 1 of 6 steps, cosine)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=2e-3)
    d = TrainConfig()
    factor = lambda step: lr_factor(step, steps=6, warmup_steps=1, min_lr_ratio=d.min_lr_ratio, schedule=d.schedule,
                                    decay_fraction=d.decay_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    expected = []
    for _ in range(6):
        expected.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    assert [float(r["lr"]) for r in mine] == expected


def test_tensorboard_event_files_only_when_installed(saved, tmp_path, monkeypatch):
    result, _ = saved
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        assert not (saved[1] / "tensorboard").exists()  # skipped cleanly
    else:
        assert sorted(p.name for p in (saved[1] / "tensorboard").iterdir()) == [
            "adam-mini-seed0", "adam-mini-seed1", "adamw-seed0", "adamw-seed1"]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    paths = result.save(tmp_path)
    assert (tmp_path / "steps.csv") in paths and not (tmp_path / "tensorboard").exists()


def test_progress_lines_give_an_eta_across_runs(monkeypatch):
    from blockopt.bench import runner

    clock = iter([0.0, 0.0, 60.0, 60.0, 190.0, 190.0])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    eta = runner._Eta(4)
    assert eta.start("adamw seed 0") == "[1/4] adamw seed 0 ..."  # nothing measured yet
    eta.finish(trained=True)
    assert eta.start("adam-mini seed 0") == "[2/4] adam-mini seed 0 ... ETA 3m00s"  # 60 s a run, 3 left
    eta.finish(trained=True)
    assert eta.start("adamw seed 1") == "[3/4] adamw seed 1 ... ETA 3m10s"  # 95 s a run, 2 left
    eta.finish(trained=False)  # loaded from an earlier invocation: no time, no weight
    assert runner._duration(42.4) == "42s" and runner._duration(3900) == "1h05m"


# ---- the command line ----------------------------------------------------------------------
def test_cli_end_to_end_writes_table_json_and_plots(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(load_corpus(max_bytes=40_000))
    env = os.environ | {"BLOCKOPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    args = [
        "compare", "--model", "gpt2-tiny", "--opt", "adamw", "--opt", "adam-mini:implementation=reference",
        "--seeds", "2", "--first-seed", "4", "--steps", "3", "--batch-size", "4", "--seq-len", "32",
        "--eval-batches", "1", "--schedule", "wsd", "--corpus", str(corpus), "--out", str(out), "--no-progress",
    ]
    done = subprocess.run([sys.executable, "-m", "blockopt", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "adam-mini:implementation=reference" in done.stdout and "final val loss" in done.stdout
    assert "[4/4] adam-mini:implementation=reference seed 5 ... ETA" in done.stdout and "state memory" in done.stdout
    assert (out / "steps.csv").is_file()
    report = json.loads((out / "compare.json").read_text())
    assert report["settings"]["seeds"] == [4, 5] and report["settings"]["schedule"] == "wsd"
    assert report["command"][:2] == ["blockopt", "compare"] and "--schedule" in report["command"]
    assert report["optimizers"]["adam-mini:implementation=reference"]["hyperparameters"]["implementation"] == "reference"
    for name in ("loss_curves.png", "memory.png", "throughput.png"):
        assert (out / name).is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["compare", "--opt", "adamz", "--out", out]) == 1
    assert "unknown optimizer 'adamz'" in capsys.readouterr().err
    assert cli.main(["compare", "--opt", "sgd-sai:betas=0.9,0.9", "--out", out]) == 1
    assert "takes no hyperparameter 'betas'" in capsys.readouterr().err
    assert cli.main(["compare", "--model", "nope", "--out", out]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert cli.main(["compare", "--model-override", "n_layers", "--out", out]) == 1
    assert "bad model override" in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing trained, nothing written
    with pytest.raises(SystemExit):
        cli.main(["compare", "--betas", "0.9"])
    assert "two numbers" in capsys.readouterr().err


def test_cli_lists_optimizers_and_shows_defaults(capsys):
    assert cli.main(["compare", "--list-optimizers"]) == 0
    listed = capsys.readouterr().out
    for name in ("adamw", "adam-mini", "adam-mini-official", "adafactor", "sgd-sai", "lion", "po:<name>"):
        assert name in listed
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    shown = capsys.readouterr().out
    assert "default: adamw adam-mini" in shown and "default: 100)" in shown and "default: 3)" in shown


def _parsed_compare(monkeypatch, argv):
    """The arguments `blockopt compare` would run with (nothing is trained)."""
    seen = []
    monkeypatch.setattr(cli, "_run_compare", seen.append)
    assert cli.main(argv) == 0
    return seen[0]


def test_cli_reads_a_toml_config_and_flags_override_it(tmp_path, monkeypatch):
    config = tmp_path / "compare.toml"
    config.write_text(
        'opt = ["adamw", "lion:lr=3e-4"]\nmodel = "gpt2-tiny"\nsteps = 40\nbatch-size = 8\nbetas = [0.9, 0.99]\n'
        'seeds = 1\nmodel_override = {n_layers = 2, dim = 64}\nschedule = "wsd"\nprogress = false\n'
    )
    args = _parsed_compare(monkeypatch, ["compare", "--config", str(config), "--steps", "7", "--opt", "adam-mini"])
    assert (args.steps, args.batch_size, args.betas, args.seeds, args.schedule) == (7, 8, (0.9, 0.99), 1, "wsd")
    assert args.opt == ["adam-mini"] and args.model == "gpt2-tiny" and args.progress is False
    assert args.model_override == ["n_layers=2,dim=64"]
    args = _parsed_compare(monkeypatch, ["--traceback", "compare", "--config", str(config)])
    assert args.opt == ["adamw", "lion:lr=3e-4"] and args.steps == 40


def test_cli_config_refuses_unknown_keys_and_bad_values(tmp_path, capsys):
    config = tmp_path / "compare.toml"
    config.write_text('steps = 10\nstepz = 3\nlearning_rate = 1e-3\n')
    assert cli.main(["compare", "--config", str(config), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'learning_rate', 'stepz' (did you mean 'steps'?); keys are the options" in err
    assert err.count("\n") == 1
    for text, said in (('steps = "three"\n', "steps = 'three': must be an integer, got 'three'"),
                       ('lr = true\n', "lr = True is not a value --lr takes"),
                       ('schedule = "zigzag"\n', "schedule = 'zigzag': choose from cosine")):
        config.write_text(text)  # a bad value names the file, not a command-line argument
        assert cli.main(["compare", "--config", str(config), "--out", str(tmp_path / "out")]) == 1
        assert f"--config {config}: {said}" in capsys.readouterr().err
    config.write_text('steps = 0\n')
    assert cli.main(["compare", "--config", str(config)]) == 1
    assert f"--config {config}: steps = 0: must be a positive integer" in capsys.readouterr().err
    config.write_text('steps = [\n')
    assert cli.main(["compare", "--config", str(config)]) == 1
    assert "not valid TOML" in capsys.readouterr().err
