"""The `blockopt` command line, through `python -m blockopt` as a user would run it."""

import json
import os
import subprocess
import sys

import pytest

from blockopt import cli
from blockopt.bench.corpus import load_corpus
from blockopt.bench.demo import DEFAULT_STEPS


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
    assert (out / "loss_curves.png").is_file()


def test_friendly_errors(tmp_path, capsys):
    assert cli.main(["demo", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_missing_bench_extras_point_to_the_install_command(monkeypatch, capsys):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else real_find_spec(name, *a)
    )
    assert cli.main(["demo"]) == 1
    assert "pip install blockopt[bench]" in capsys.readouterr().err
