"""The one result format (`write_result`/`read_result`): schema, command, environment, NaN as null."""

import json
import math
import shlex

import pytest

import blockopt
from blockopt.bench import RunResult, environment, read_result, write_result
from blockopt.bench.results import SCHEMA, command_line


def test_round_trip_with_schema_command_and_environment(tmp_path):
    settings = {"steps": 10, "betas": (0.9, 0.95)}
    results = {"adamw": {"final_val_loss": 3.5, "curve": [(1, 4.0), (2, 3.5)]}}
    path = write_result(tmp_path / "out" / "run", name="toy", settings=settings, results=results,
                        argv=["benchmarks/toy/run.py", "--steps", "10", "--note", "two words"])
    assert path == tmp_path / "out" / "run" / "result.json" and path.is_file()
    document = read_result(path.parent)  # a folder reads its result.json
    assert document == read_result(path) == json.loads(path.read_text())
    assert document["schema"] == SCHEMA == "blockopt.result/1" and document["name"] == "toy"
    assert shlex.split(document["command"]) == ["benchmarks/toy/run.py", "--steps", "10", "--note", "two words"]
    assert document["created"].endswith("+00:00")  # UTC
    assert document["settings"] == {"steps": 10, "betas": [0.9, 0.95]}  # tuples become lists
    assert document["results"] == {"adamw": {"final_val_loss": 3.5, "curve": [[1, 4.0], [2, 3.5]]}}
    assert document["environment"]["versions"]["blockopt"] == blockopt.__version__
    assert set(document["environment"]) == set(environment())


def test_the_default_command_is_this_process_relative_to_the_working_directory(tmp_path, monkeypatch):
    script = tmp_path / "benchmarks" / "study.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(script), "--seed", "1"])
    assert command_line() == "benchmarks/study.py --seed 1"
    document = read_result(write_result(tmp_path, name="study", settings={}, results={}))
    assert document["command"] == "benchmarks/study.py --seed 1"
    assert command_line(["/elsewhere/run.py"]) == "/elsewhere/run.py"  # outside: kept as given


def test_extra_distributions_and_the_device_are_recorded(tmp_path):
    document = read_result(write_result(tmp_path, name="x", settings={}, results={}, distributions=("no-such-pkg",)))
    assert document["environment"]["versions"]["no-such-pkg"] is None
    assert document["environment"]["machine"]["device"] == "cpu"


def test_an_environment_captured_at_the_start_is_written_with_the_load_at_the_end(tmp_path, monkeypatch):
    loads = iter([(1.0, 1.0, 1.0), (3.0, 2.0, 1.5)])
    monkeypatch.setattr("os.getloadavg", lambda: next(loads))
    started = environment()
    document = read_result(write_result(tmp_path, name="x", settings={}, results={}, environment=started))
    assert document["environment"]["machine"]["load_average_start"] == [1.0, 1.0, 1.0]
    assert document["environment"]["machine"]["load_average_end"] == [3.0, 2.0, 1.5]
    assert "load_average_end" not in started["machine"]  # the caller's dict is left alone
    assert document["environment"]["versions"] == started["versions"]


def test_nan_and_inf_are_written_as_null_and_read_back_as_nan(tmp_path):
    run = RunResult(
        optimizer="AdamW", train_curve=[(1, 5.0), (2, float("nan"))], val_curve=[(2, float("inf"))],
        final_train_loss=float("nan"), final_val_loss=float("inf"), step_ms=float("nan"), tokens_per_s=1.0,
        state_bytes=8, n_params=1, wall_s=1.0,
    )
    path = write_result(tmp_path, name="diverged", settings={"lr": 1e9}, results={"run": run.to_dict()})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    raw = read_result(path)["results"]["run"]
    assert raw["final_val_loss"] is None and raw["train_curve"][1] == [2, None]
    loaded = RunResult.from_dict(raw)  # a reader that knows the float fields turns null back into NaN
    assert math.isnan(loaded.final_train_loss) and math.isnan(loaded.final_val_loss) and math.isnan(loaded.step_ms)
    assert loaded.train_curve[0] == (1, 5.0) and math.isnan(loaded.train_curve[1][1])


def test_environment_is_the_function_even_once_its_module_is_imported():
    import blockopt.bench
    import blockopt.bench.environment  # noqa: F401 (what results.py does)

    assert callable(blockopt.bench.environment) and blockopt.bench.environment is environment


def test_other_files_are_refused_naming_the_file(tmp_path):
    other = tmp_path / "compare.json"
    other.write_text(json.dumps({"schema": "blockopt.compare/1"}))
    with pytest.raises(ValueError, match=r"compare.json is not a blockopt.result/1 document \(schema: 'blockopt.compare/1'\)"):
        read_result(other)
    (tmp_path / "old.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(ValueError, match=r"old.json is not a blockopt.result/1 document \(schema: None\)"):
        read_result(tmp_path / "old.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not JSON"):
        read_result(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        read_result(tmp_path / "missing")
