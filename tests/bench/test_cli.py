"""The `blockopt` command line, through `python -m blockopt` as a user would run it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from blockopt import cli
from blockopt.bench.corpus import load_corpus
from blockopt.bench.demo import DEFAULT_STEPS
from tests.test_cli_plan import cli_failure


def blockopt_cmd(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "blockopt", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_help_lists_demo_and_its_options(capsys):
    with pytest.raises(SystemExit) as top:
        cli.main(["--help"])
    assert top.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    demo_help = capsys.readouterr().out
    for option in ("--corpus", "--steps", "--out", "--seed", "--no-progress"):
        assert option in demo_help
    assert f"default: {DEFAULT_STEPS})" in demo_help


def test_demo_runs_end_to_end(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(load_corpus(max_bytes=60_000))
    # One thread: this checks the plumbing, not speed, and stays quick on a busy machine.
    env = os.environ | {"BLOCKOPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    result = blockopt_cmd(
        "demo", "--corpus", str(corpus), "--steps", "1", "--out", str(out), "--seed", "1", "--no-progress", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "Adam-mini / AdamW state memory:" in result.stdout
    report = json.loads((out / "demo.json").read_text())
    assert report["hyperparameters"]["steps"] == 1 and report["hyperparameters"]["seed"] == 1
    # the kernel is built or loaded in a first step before the runs: no run's figures hold it
    assert set(report["timings_s"]["first_step"]) == {"AdamW", "Adam-mini"} and "kernel_build" in report["timings_s"]
    assert result.stdout.index("first step of each optimizer") < result.stdout.index("[1/2] AdamW seed 1 ...")
    assert (out / "loss_curves.png").is_file()


@pytest.mark.parametrize(
    "argv, status, words",
    [
        (["demo", "--corpus", "{tmp}/missing"], 1, ["corpus path", "missing", "does not exist"]),
        (["demo", "--corpus", "{tmp}/binary.bin"], 1, ["no text found in", "binary.bin"]),
        (["demo", "--corpus", "{tmp}/short.txt", "--no-progress"], 1,
         ["corpus '{tmp}/short.txt' is too short for seq_len=128: of its", "tokens the validation part holds 1,",
          "pass a longer corpus or a smaller seq_len (--seq-len)"]),
        (["demo", "--out", "{tmp}/a-file", "--corpus", "{tmp}/short.txt"], 2,
         ["argument --out: '{tmp}/a-file' is a file, not a folder"]),
        (["compare", "--out", "{tmp}/a-file"], 2, ["argument --out: '{tmp}/a-file' is a file, not a folder"]),
        (["demo", "--steps", "0"], 2, ["argument --steps", "positive integer", "blockopt demo --help"]),
        (["demo", "--steps", "ten"], 2, ["argument --steps: must be an integer, got 'ten'"]),
        (["demo", "--seed", "1.5"], 2, ["argument --seed: must be an integer, got '1.5'"]),
        (["compare", "--corpus", "{tmp}/short.txt", "--seeds", "1", "--no-progress"], 1, ["short.txt' is too short"]),
        (["compare", "--max-bytes", "3000", "--seeds", "1", "--no-progress"], 1,
         ["the built-in corpus (the standard library) is too short for seq_len=128", "a larger max_bytes (--max-bytes), "
          "or a smaller seq_len (--seq-len)"]),
        (["compare", "--corpus", "{tmp}/missing"], 1, ["does not exist"]),
        (["compare", "--opt", "adamz"], 1, ["unknown optimizer 'adamz'", "registered: adamw"]),
        (["compare", "--opt", "adamw:foo=1"], 1, ["takes no hyperparameter 'foo'"]),
        (["compare", "--opt", "adamw:betas=(0.9,)"], 1, ["betas must be a pair"]),
        (["compare", "--opt", "adamw:lr=abc"], 1, ["bad override in 'adamw:lr=abc': lr must be a number, got 'abc'"]),
        (["compare", "--opt", "adamw:lr"], 1, ["bad override 'lr' in 'adamw:lr': write key=value"]),
        (["compare", "--opt", "lion:betas=0.9"], 1, ["betas must be a pair, each a number, got 0.9"]),
        (["compare", "--opt", "adam-mini:lr=-1"], 1, ["lr must be a number >= 0, got -1"]),
        (["compare", "--opt", "adamw", "--opt", "adamw"], 1, ["adamw is listed twice"]),
        (["compare", "--opt", "adamw:lr=1e-3", "--opt", "adamw: lr=0.001"], 1,
         ["optimizers 'adamw:lr=1e-3' and 'adamw: lr=0.001' are the same run (same name and overrides)"]),
        (["compare", "--baseline", "lion"], 1, ["baseline 'lion' is not one of the optimizers"]),
        (["compare", "--lr", "-1"], 1, ["lr must be a number > 0, got -1.0"]),
        (["compare", "--lr", "nan"], 1, ["lr must be a number > 0, got nan"]),
        (["compare", "--lr", "fast"], 2, ["argument --lr", "invalid float value: 'fast'"]),
        (["compare", "--betas", "0.9"], 2, ["argument --betas", "two numbers"]),
        (["compare", "--betas", "0.9,x"], 2, ["argument --betas: write two numbers like 0.9,0.95; got '0.9,x'"]),
        (["compare", "--config", "{tmp}/missing.toml"], 1, ["--config {tmp}/missing.toml: cannot read it (No such file"]),
        (["compare", "--config", "{tmp}/unknown.toml"], 1, ["unknown key 'bogus'; keys are the options of `blockopt compare --help`"]),
        (["compare", "--betas", "1.5,0.9"], 1, ["betas[0] must be a number in [0, 1), got 1.5"]),
        (["compare", "--decay-fraction", "2"], 1, ["decay_fraction must be a number in [0, 1], got 2.0"]),
        (["compare", "--seq-len", "100000"], 1, ["seq_len=100000 exceeds the model's maximum"]),
        (["compare", "--seeds", "0"], 2, ["argument --seeds", "positive integer"]),
        (["compare", "--schedule", "zigzag"], 2, ["argument --schedule", "invalid choice: 'zigzag'"]),
        (["compare", "--device", "banana"], 2, ["argument --device", "'banana' is not a torch device"]),
        (["compare", "--model", "nope"], 1, ["unknown model 'nope'"]),
        (["compare", "--model-override", "n_layers"], 1, ["bad model override 'n_layers'"]),
        (["compare", "--model-override", "n_head=2"], 1, ["has no field 'n_head'"]),
        (["compare", "--model-override", "dim=abc"], 1, ["bad model override dim='abc': dim is a number (now"]),
        (["compare", "--model-override", "dim=64,dim=32"], 1, ["model override 'dim' is given twice (dim=64, dim=32)"]),
        (["compare", "--opt", "adamw:lr=1e-3,,eps=1e-8"], 1, ["a stray comma after the value: remove it"]),
        (["compare", "--device", "meta"], 2, ["argument --device: 'meta' holds no data to train on"]),
        (["compare", "--out", ""], 2, ["argument --out: an empty path"]),
        (["compare", "--out", "{tmp}/a-file/sub"], 2, ["argument --out: '{tmp}/a-file/sub' can't be created: '{tmp}/a-file' is a file"]),
        (["compare", "--steps", "2", "--warmup-steps", "50"], 1, ["warmup_steps=50 exceeds steps=2 (--warmup-steps, --steps)"]),
        (["compare", "--config", "{tmp}/binary.bin"], 1, ["--config {tmp}/binary.bin: not valid TOML"]),
        (["audit", "demo", "--seed", "-1"], 2, ["argument --seed"]),
        (["zero-to-state", "{tmp}", "{tmp}"], 2, ["argument output: '{tmp}' is a folder: name the file to write"]),
        (["zero-to-state", "{tmp}", "{tmp}/missing/state.pt"], 2, ["its folder '{tmp}/missing' does not exist"]),
    ],
)
def test_bad_input_is_one_line_and_exit_status_1_or_2(tmp_path, capsys, monkeypatch, argv, status, words):
    monkeypatch.setenv("BLOCKOPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "short.txt").write_text("far shorter than one sequence")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "unknown.toml").write_text("bogus = 1\n")
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv]
    got, err = cli_failure(argv if "--out" in argv else [*argv, "--out", str(out)], capsys)
    assert got == status
    for word in words:
        assert word.format(tmp=tmp_path) in err
    assert not any(out.rglob("*.pt"))  # refused before training


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_zero_to_state_of_a_missing_folder_says_so(tmp_path, capsys):
    status, err = cli_failure(["zero-to-state", str(tmp_path / "missing"), str(tmp_path / "state.pt")], capsys)
    assert status == 1 and f"'{tmp_path / 'missing'}' is not a folder" in err


def test_zero_to_state_of_a_file_that_is_no_checkpoint_names_it(tmp_path, capsys):
    step = tmp_path / "ckpt" / "global_step1"
    step.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("global_step1")
    bad = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad.write_bytes(b"garbage, not a pickle")
    status, err = cli_failure(["zero-to-state", str(tmp_path / "ckpt"), str(tmp_path / "state.pt")], capsys)
    assert status == 1 and f"{bad}: not a readable torch checkpoint" in err and "unexpected" not in err


def test_plan_reads_hf_names_as_compare_does(capsys):
    pytest.importorskip("transformers")
    assert cli.main(["plan", "hf:llama", "--max-rows", "3"]) == 0  # a model_type's defaults
    assert "model.layers.{0..31}.self_attn.q_proj.weight" in capsys.readouterr().out
    assert cli.main(["plan", "hf:gpt2", "--max-rows", "3"]) == 0  # a named shape
    assert "transformer.h.{0..11}" in capsys.readouterr().out


def test_cuda_without_cuda_is_a_usage_error(capsys):
    status, err = cli_failure(["compare", "--device", "cuda:1"], capsys)
    assert status == 2 and "has no usable cuda device" in err


def test_missing_bench_extras_point_to_the_install_command(monkeypatch, capsys):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else real_find_spec(name, *a)
    )
    status, err = cli_failure(["demo"], capsys)
    assert status == 1 and "pip install blockopt[bench]" in err


def test_ctrl_c_is_one_line(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("blockopt.bench.demo.run_demo", interrupted)
    status, err = cli_failure(["demo"], capsys)
    assert status == 1 and err == "blockopt: error: interrupted\n"
    monkeypatch.setattr("blockopt.bench.runner.compare", interrupted)
    status, err = cli_failure(["compare", "--out", "somewhere"], capsys)
    assert status == 1 and "run the same command with --resume" in err
