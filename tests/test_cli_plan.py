"""`blockopt plan`: a model from a config on the meta device -> rows (identical layers collapsed),
summary, memory figures; every bad input -> one line on stderr and exit status 1 or 2."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from torch import nn

import blockopt
from blockopt import cli
from blockopt.cli import main

from .cli_support import cli_failure
from blockopt.partition.report import plan_rows, rows_table

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}


def write_config(folder, name="config.json", **changes) -> str:
    path = folder / name
    path.write_text(json.dumps(LLAMA | changes))
    return str(path)


def blockopt_cmd(*args, env=None):
    env = os.environ | {"HF_HUB_OFFLINE": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "blockopt", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.hf
def test_plan_prints_table_summary_and_memory(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["plan", write_config(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.k_proj.weight" in out and "2 x8 rows" in out
    assert "second-moment scalars: 313 vs AdamW's 11,872" in out
    # AdamW: 2 x 4 bytes x 11,872 params; Adam-mini: 4 x 11,872 + 4 x 313
    assert "float32" in out and "bfloat16" in out


@pytest.mark.hf
def test_identical_layers_share_a_row_with_a_count(tmp_path, capsys):
    pytest.importorskip("transformers")
    config = write_config(tmp_path, num_hidden_layers=3)
    assert main(["plan", config]) == 0
    out = capsys.readouterr().out
    q_row = next(line for line in out.splitlines() if ".self_attn.q_proj.weight" in line)
    assert q_row.startswith("model.layers.{0..2}.self_attn.q_proj.weight") and q_row.split()[1] == "3"
    assert "model.layers.1." not in out and "(30 tensors in 12 rows" in out
    assert main(["plan", config, "--expand"]) == 0
    assert "model.layers.1.self_attn.q_proj.weight" in capsys.readouterr().out


@pytest.mark.hf
def test_json_and_csv_give_every_row_for_tools(tmp_path, capsys):
    pytest.importorskip("transformers")
    config = write_config(tmp_path, num_hidden_layers=2)
    assert main(["plan", config, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_class"] == "LlamaForCausalLM" and report["warnings"] == []
    k = next(row for row in report["rows"] if row["name"] == "model.layers.{0,1}.self_attn.k_proj.weight")
    assert k | {"reason": None} == {"name": k["name"], "count": 2, "shape": [16, 32], "rule": "heads", "n_blocks": 2,
                                    "role": "key", "layout": "2 x8 rows", "reason": None, "aliases": []}
    assert sum(row["count"] for row in report["rows"]) == report["summary"]["n_tensors"] == 21
    assert [s["state_dtype"] for s in report["state_bytes"]] == ["float32", "bfloat16"]
    assert main(["plan", config, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["name"] for r in rows] == [r["name"] for r in report["rows"]]
    assert rows[0] | {"reason": ""} == {"name": "model.embed_tokens.weight", "count": "1", "shape": "64x32", "rule": "rows",
                                        "n_blocks": "64", "role": "embedding", "layout": "64 rows", "reason": "", "aliases": ""}


def test_collapsing_keeps_a_layer_that_differs_apart():
    # 5 layers x 3 experts; layer 2's expert 1 is wider
    model = nn.ModuleList(nn.ModuleList(nn.Linear(4, 4) for _ in range(3)) for _ in range(5))
    model[2][1] = nn.Linear(4, 6)
    plan = blockopt.partition(model)
    rows = {row.name: row.count for row in plan_rows(plan)}
    assert rows == {"{0,1,3,4}.{0..2}.weight": 12, "{0,1,3,4}.{0..2}.bias": 12, "2.{0,2}.weight": 2,
                    "2.{0,2}.bias": 2, "2.1.weight": 1, "2.1.bias": 1}
    assert len(plan_rows(plan, collapse=False)) == len(plan) == 30
    assert rows_table(plan_rows(plan), max_rows=2).endswith("... 4 more rows (6 tensors)")


@pytest.mark.hf
def test_named_shapes_and_a_model_folder_still_plan(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["plan", "llama-2-7b", "--max-rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.{0..31}.self_attn.q_proj.weight" in out and "32 x128 rows" in out
    write_config(tmp_path)
    assert main(["plan", str(tmp_path)]) == 0 and "LlamaForCausalLM" in capsys.readouterr().out


BAD_CONFIGS = [
    ('{"model_type": "llama", "hidden_size": 32,', ["config.json is not valid JSON", "line 1, column 43"]),
    ("", ["not valid JSON", "line 1, column 1"]),
    ("5", ["holds no JSON object"]),
    ('{"vocab_size": 64}', ["has no 'model_type'"]),
    (LLAMA | {"hidden_size": -32}, ["config.json: hidden_size must be an int >= 0, got -32"]),
    (LLAMA | {"num_hidden_layers": -1}, ["num_hidden_layers must be an int >= 0, got -1"]),
    (LLAMA | {"hidden_size": 30}, ["not a valid llama config", "hidden size (30) is not a multiple", "heads (4)"]),
    (LLAMA | {"vocab_size": "many"}, ["not a valid llama config", "vocab_size", "'many'"]),
    (LLAMA | {"hidden_size": 0}, ["cannot build a llama model", "hidden_size=0"]),
    ({"model_type": "gpt2", "n_embd": 30, "n_head": 4, "n_layer": 1}, ["cannot build a gpt2 model", "divisible"]),
    ({"model_type": "lama"}, ["unknown model_type 'lama'", "did you mean llama", "transformers.CONFIG_MAPPING"]),
    ({"model_type": 5}, ["unknown model_type 5"]),
]


def _bad_config(folder, contents) -> str:
    path = folder / "config.json"
    path.write_text(contents if isinstance(contents, str) else json.dumps(contents))
    return str(path)


@pytest.mark.hf
@pytest.mark.parametrize("contents, words", BAD_CONFIGS)
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, contents, words):
    pytest.importorskip("transformers")
    path = _bad_config(tmp_path, contents)
    status, err = cli_failure(["plan", path], capsys)
    assert status == 1 and path in err and len(err) < 400
    for word in words:
        assert word in err


@pytest.mark.hf
@pytest.mark.parametrize("contents, words", BAD_CONFIGS)
def test_compare_says_of_a_bad_config_file_what_plan_says(tmp_path, capsys, contents, words):
    """One reader (`blockopt.hf`): ``compare --model FILE`` refuses a config in plan's words."""
    pytest.importorskip("transformers")
    path = _bad_config(tmp_path, contents)
    plan_line = cli_failure(["plan", path], capsys)[1]
    status, err = cli_failure(["compare", "--model", path, "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert status == 1 and err == plan_line


@pytest.mark.hf
def test_hf_names_the_config_in_each_error(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(blockopt.hf.ConfigError, match=r"^my config: hidden_size must be an int >= 0, got -32$"):
        blockopt.hf.config_from_fields(LLAMA | {"hidden_size": -32}, source="my config")
    with pytest.raises(blockopt.hf.ConfigError, match=r"^the llama config: not a valid llama config: Field 'vocab_size'"):
        blockopt.hf.config_from_fields(LLAMA | {"vocab_size": "many"})
    config = blockopt.hf.config_from_fields(LLAMA | {"hidden_size": 0})
    with pytest.raises(blockopt.hf.ConfigError, match=r"^tiny: transformers cannot build a llama model from it \(hidden_size=0"):
        blockopt.hf.meta_model(config, source="tiny")
    with pytest.raises(FileNotFoundError, match=r"the folder has no config.json"):
        blockopt.hf.load_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"nor a config.json file \(did you mean llama-2-7b, "):
        blockopt.hf.load_config("llama-2-7")


@pytest.mark.hf
@pytest.mark.parametrize(
    "argv, status, words",
    [
        (["plan", "{tmp}/nope.json"], 1, ["nope.json: no such file or folder"]),
        (["plan", "{tmp}"], 1, ["the folder has no config.json"]),
        (["plan", "{tmp}/binary.json"], 1, ["binary.json is not a text file"]),
        (["plan", "a path with spaces"], 1, ["no such file or folder"]),
        (["plan", "/dev/null"], 1, ["not a file or folder"]),
        (["plan", "llama-2-7b", "--format", "xml"], 2, ["--format", "invalid choice: 'xml'", "blockopt plan --help"]),
        (["plan", "llama-2-7b", "--max-rows", "0"], 2, ["--max-rows", "positive integer"]),
        (["plan", "llama-2-7b", "--value", "cols"], 2, ["--value", "invalid choice"]),
        (["plan"], 2, ["required: MODEL"]),
        (["plan", "llama-2-7b", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
        (["nonsense"], 2, ["invalid choice: 'nonsense'"]),
        ([], 2, ["required: COMMAND"]),
    ],
)
def test_bad_plan_arguments_are_one_line(tmp_path, capsys, argv, status, words):
    pytest.importorskip("transformers")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00{}")
    got, err = cli_failure([a.format(tmp=tmp_path) for a in argv], capsys)
    assert got == status
    for word in words:
        assert word in err


@pytest.mark.hf
def test_a_hub_id_offline_fails_in_one_line_and_a_cached_one_plans(tmp_path):
    pytest.importorskip("transformers")
    cache = tmp_path / "hub"
    done = blockopt_cmd("plan", "acme/tiny-llama", env={"HF_HUB_CACHE": str(cache)})
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "'acme/tiny-llama'" in done.stderr and "not in the local cache, and HF_HUB_OFFLINE is set" in done.stderr
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA))
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abc")
    done = blockopt_cmd("plan", "acme/tiny-llama", "--format", "csv", env={"HF_HUB_CACHE": str(cache)})
    assert done.returncode == 0 and done.stderr == "" and "model.layers.0.self_attn.k_proj.weight" in done.stdout


@pytest.mark.hf
def test_a_mistyped_named_shape_is_looked_up_then_suggested(capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    status, err = cli_failure(["plan", "llama-2-7"], capsys)
    assert status == 1 and "(did you mean llama-2-7b?)" in err and "HF_HUB_OFFLINE is set" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"blockopt {blockopt.__version__}\n"


@pytest.mark.hf
def test_traceback_on_request(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["--traceback", "plan", missing])
    with pytest.raises(FileNotFoundError):
        main(["plan", missing, "--traceback"])
    monkeypatch.setenv("BLOCKOPT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["plan", missing])


@pytest.mark.hf
def test_an_unexpected_error_is_one_line_asking_for_a_report(capsys, monkeypatch):
    pytest.importorskip("transformers")

    def broken(plan, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(sys.modules["blockopt.partition.report"], "plan_rows", broken)
    status, err = cli_failure(["plan", "gpt2"], capsys)
    assert status == 1 and "unexpected RuntimeError: boom second line" in err and "--traceback" in err


def test_long_messages_are_clipped():
    names = [f"type{i}" for i in range(800)]
    text = cli._message(ValueError(f"unknown x; should be one of {', '.join(names)}."))
    assert text.startswith("unknown x; should be one of type0, type1") and text.endswith("... (795 more)")
    assert len(text) < 120
    assert len(cli._message(ValueError("y" * 5000))) < cli.MAX_MESSAGE + 40
