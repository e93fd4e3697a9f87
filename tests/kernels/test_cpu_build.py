"""Building the fused CPU kernel: its cache key, the one line a build prints, and `blockopt build`.

Every test here but the last mocks the compiler (`cpp_extension.load`): a real cold build takes
~15 s. The last loads the real kernel through the command line, from the cache the kernel tests
fill anyway.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from blockopt import cli
from blockopt.kernels.adam_mini import cpu

KEY = dict(torch_version="2.13.0+cpu", cxx11_abi=True, python="cpython3.11", flags=["-O3", "-fopenmp"], source=b"int x;")


def test_the_cache_key_changes_with_everything_a_build_depends_on():
    key = cpu.cache_key(**KEY)
    assert cpu.cache_key(**KEY) == key and len(key) == 12
    for change in (
        {"torch_version": "2.12.1+cpu"}, {"cxx11_abi": False}, {"python": "cpython3.12"},
        {"flags": ["-O3"]}, {"source": b"int y;"},
        {"location": "/another/venv/lib/python3.11/site-packages/torch"},  # same torch, another environment
    ):
        assert cpu.cache_key(**{**KEY, **change}) != key, change


def test_the_build_folder_is_named_by_the_key_under_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name, directory, cflags, ldflags = cpu.extension()
    key = cpu.cache_key(
        torch_version=torch.__version__, cxx11_abi=torch._C._GLIBCXX_USE_CXX11_ABI,
        python=f"{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}{sys.abiflags}",
        flags=cflags + ldflags, source=cpu._SOURCE.read_bytes(), location=os.path.dirname(torch.__file__),
    )
    assert name.endswith("_" + key) and directory == tmp_path / name and key in str(directory)
    # another torch in another virtual environment: another folder, nothing rebuilt over this one
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert cpu.extension()[1] != directory


@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    """`cpp_extension.load` replaced by one that records its calls and writes the library."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "last_build", None)
    monkeypatch.setattr(cpu, "load_seconds", None)
    calls = []

    def load(name, build_directory, **kwargs):
        calls.append(build_directory)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(cpp_extension, "load", load)
    return calls


def test_a_build_says_so_in_one_line_and_a_cached_load_says_nothing(fake_compiler, capsys):
    built = cpu.build()
    err = capsys.readouterr().err
    assert err.startswith("blockopt: building the fused CPU Adam-mini kernel (once per environment)... done in ")
    assert err.endswith(" s\n") and err.count("\n") == 1
    assert built.built and fake_compiler == [str(built.directory)] and cpu.last_build == built
    again = cpu.build()
    assert not again.built and again.directory == built.directory and capsys.readouterr().err == ""


def test_a_failed_build_finishes_its_line_and_raises_one_line(fake_compiler, monkeypatch, capsys):
    def broken(**kwargs):
        raise RuntimeError("Error building extension 'x':\nfoo.cpp:1: error: no compiler here\nmore")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(cpu.KernelBuildError, match="^RuntimeError: foo.cpp:1: error: no compiler here$"):
        cpu.build()
    assert " failed in " in capsys.readouterr().err and cpu.last_build is None


def test_cli_build_says_where_and_how_long(fake_compiler, tmp_path, monkeypatch, capsys):
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fused CPU Adam-mini kernel built in ") and str(cpu.last_build.directory) in out
    assert cli.main(["build"]) == 0
    assert "loaded from the cache" in capsys.readouterr().out

    def no_ninja(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    assert cli.main(["build"]) == 1
    building, error = capsys.readouterr().err.splitlines()  # the build line, finished as failed; the error
    assert building.endswith(" s") and " failed in " in building
    assert error.startswith("blockopt: error: cannot build the fused CPU Adam-mini kernel (RuntimeError: Ninja is required")


def test_python_m_blockopt_build_loads_the_real_kernel():
    cpu.kernel()  # built once for the kernel tests; here it loads from the cache
    done = subprocess.run([sys.executable, "-m", "blockopt", "build"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("fused CPU Adam-mini kernel loaded from the cache in ") and done.stderr == ""
