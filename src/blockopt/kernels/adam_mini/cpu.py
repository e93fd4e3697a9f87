"""The fused CPU step of Adam-mini: one C++ kernel call per step for a whole list of tensors.

The kernel (``csrc/adam_mini_cpu.cpp``) is compiled with ``torch.utils.cpp_extension`` the first
time it is needed (or by ``blockopt build``, which set-up runs) and cached in the torch extensions
directory (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``): the first build
takes about 15 s on two cores and says so in one line on stderr; loading it from the cache takes
well under a second and says nothing. Without a compiler, or when the build fails, one warning is
shown and every step runs batched.

Note [the cache key]: the extension's name, and so its build folder, ends in `cache_key` of the
torch version, its C++ ABI, the Python version, the compiler flags and the source's hash. Two
virtual environments on one machine (another torch, another Python) then each keep their own
build instead of rebuilding over each other's, and an edited source never loads a stale build.

Note [which tensors the kernel takes]: CPU tensors of float32, float64, bfloat16 or float16, the
gradient in the parameter's dtype and the first moment either in it too or compressed (a
`StoredMomentum` of the ``bfloat16``, ``int8`` or ``int4`` codec, for float32, bfloat16 and
float16 parameters: the kernel decodes, updates and encodes it in registers, with the codes of
the decoded path), whose blocks are contiguous ranges of units along a run of consecutive dims
(`KernelLayout`): rows, heads, whole, fused row or column segments, experts
(``block_dims=(0, 1)``), columns of an ``(in, out)`` weight, and the per-coordinate rule (as plain
Adam). A plain first moment may also be float32 for a bf16 or float16 parameter
(``momentum_dtype="float32"``). One kernel call steps each kind of first moment. A tensor that is
not contiguous is stepped through a contiguous copy. Everything else (such as a compressed m of a
float64 parameter, whose m is decoded to float64), and every step whose block sums were
summed across ranks first (``sq_sums``), runs batched, decoded where compressed
(`fused.fused_adam_mini` sees to that). The choice is made from dtypes, devices, storages and
layouts alone, never from values: a compiled step makes it while tracing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..codecs import StoredMomentum
from .layout import kernel_args

_SOURCE = Path(__file__).parent / "csrc" / "adam_mini_cpu.cpp"

# Seconds the last `kernel()` call spent building or loading the extension (for benchmarks).
load_seconds: float | None = None
# How the kernel of this process was built or loaded (`build`), once it has been.
last_build: KernelBuild | None = None


class KernelBuildError(RuntimeError):
    """The kernel could not be built here (no compiler, no ninja, a failed compile); the message
    is one line that says why."""


@dataclass(frozen=True)
class KernelBuild:
    """Where the kernel lives, how long building or loading it took, and whether it was compiled
    now (``built``) or loaded from the cache."""

    directory: Path
    seconds: float
    built: bool


def _build_flags() -> tuple[str, list[str], list[str]]:
    """Extension name (without its cache key), compiler flags and linker flags for this CPU and
    this torch.

    Note: the name carries the instruction set, so a cache directory shared by machines with
    different CPUs never hands one of them code it cannot run (why not ``-march=native``).
    ``-ffp-contract=off`` keeps fma where the source says fma (as ATen's kernels do) and nowhere
    else. With torch's OpenMP backend, ``at::parallel_for`` is inline OpenMP code, so the kernel
    is built with ``-fopenmp`` (at run time it shares torch's ``libgomp``); without it, it would
    run on one thread.
    """
    name, cflags, ldflags = "blockopt_adam_mini_cpu", ["-O3", "-ffp-contract=off"], []
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        name, cflags = name + "_avx2", cflags + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        cflags, ldflags = cflags + ["-fopenmp"], ldflags + ["-fopenmp"]
    return name, cflags, ldflags


def cache_key(*, torch_version: str, cxx11_abi: bool, python: str, flags: list[str], source: bytes,
              location: str = "") -> str:
    """A short hash of everything a build depends on (Note [the cache key]). ``location``: where
    this torch is installed; its headers' paths are in the build commands, so two environments
    with the same torch version would otherwise rebuild over each other whenever the other ran last."""
    parts = [torch_version, str(bool(cxx11_abi)), python, " ".join(flags), hashlib.sha256(source).hexdigest(), location]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def extension() -> tuple[str, Path, list[str], list[str]]:
    """This environment's extension name, build folder, compiler and linker flags."""
    from torch.utils import cpp_extension

    base, cflags, ldflags = _build_flags()
    key = cache_key(
        torch_version=torch.__version__, cxx11_abi=torch._C._GLIBCXX_USE_CXX11_ABI,
        python=f"{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}{getattr(sys, 'abiflags', '')}",
        flags=cflags + ldflags, source=_SOURCE.read_bytes(), location=os.path.dirname(torch.__file__),
    )
    name = f"{base}_{key}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return name, Path(root) / name, cflags, ldflags


def build() -> KernelBuild:
    """Build the kernel, or load it from the cache; one line on stderr when it compiles.

    Raises:
        KernelBuildError: no compiler or ninja here, or the compile failed (one line saying why).
    """
    global last_build, load_seconds
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        name, directory, cflags, ldflags = extension()
        compiling = not (directory / f"{name}.so").is_file()
        if compiling:
            print("blockopt: building the fused CPU Adam-mini kernel (once per environment)...", end="",
                  file=sys.stderr, flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        # Build from a copy inside the build folder: the folder's key holds the source's hash, and
        # ninja records source paths, so two checkouts (or installs) of the same source share one
        # build instead of rebuilding over each other whenever the other one ran last.
        source = directory / _SOURCE.name
        if not source.is_file() or source.read_bytes() != _SOURCE.read_bytes():
            source.write_bytes(_SOURCE.read_bytes())
        outcome = "failed"
        try:
            cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=ldflags,
                               build_directory=str(directory), is_python_module=False)
            outcome = "done"
        finally:
            if compiling:  # the line is finished, whatever happened
                print(f" {outcome} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    except Exception as error:  # no compiler, no ninja, a failed build
        raise KernelBuildError(f"{type(error).__name__}: {_reason(error)}") from error
    load_seconds = time.perf_counter() - start
    last_build = KernelBuild(directory, load_seconds, compiling)
    return last_build


def _reason(error: Exception) -> str:
    """The line of a compiler's output that says what went wrong (else the last one)."""
    lines = str(error).splitlines()
    reason = next((line for line in lines if "error" in line.lower() and "Error building" not in line),
                  lines[-1] if lines else "")
    return reason.strip()


@functools.cache
def kernel():
    """The compiled ``adam_mini_step`` op, or ``None`` (after one warning) if it can't be built."""
    try:
        build()
    except KernelBuildError as error:
        warnings.warn(
            f"blockopt: could not build the fused CPU Adam-mini kernel ({error}); "
            "steps run the batched implementation instead. Install a C++ compiler and `ninja` for the fast path.",
            RuntimeWarning, stacklevel=2,
        )
        return None
    global _fake_registered
    if not _fake_registered:  # (once per process: the op outlives a cleared cache)
        torch.library.register_fake("blockopt::adam_mini_step")(_fake_step)
        _fake_registered = True
    return torch.ops.blockopt.adam_mini_step


_fake_registered = False


def _fake_step(*args, **kwargs) -> None:
    """What a compiled step sees of the kernel: it writes its inputs in place (the schema says
    which) and returns nothing, so there is nothing to compute."""


# Note [built before tracing]: `torch.compile` calls this once while tracing and keeps the answer,
# so the build (or the cache load) runs then, eagerly, and the graph holds only the op.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the fused CPU kernel can run here (builds it on first call)."""
    return kernel() is not None


def handles(p: Tensor) -> bool:
    return p.is_cpu


_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))
PLAIN = 0  # the kernel's momentum_codec for a first moment in the parameter's dtype
# The codecs the C++ code implements, by their momentum_codec: as `codecs.CODECS` defines them
# (ChunkQuantized with chunk=256, power=2 and stochastic rounding; tested).
KERNEL_CODECS = {"bfloat16": 1, "int8": 2, "int4": 3}
_LOW_PRECISION = frozenset((torch.bfloat16, torch.float16))
# Compressed momenta of these parameter dtypes (float32 math; float64 ones are decoded to float64).
_COMPRESSED_DTYPES = _LOW_PRECISION | {torch.float32}


def _codec_number(p: Tensor, m) -> int | None:
    """The kernel's momentum_codec for this parameter and first moment, or None where it doesn't take them."""
    if isinstance(m, Tensor):  # (in float32 for a bf16/fp16 parameter: momentum_dtype="float32")
        return PLAIN if m.dtype is torch.float32 and p.dtype in _LOW_PRECISION else None
    if isinstance(m, StoredMomentum) and p.dtype in _COMPRESSED_DTYPES and m.codec in KERNEL_CODECS:
        return KERNEL_CODECS[m.codec]
    return None


def step(params, grads, exp_avgs, exp_avg_sqs, steps, layouts, *, lr, beta1, beta2, eps, weight_decays, maximize) -> list[int]:
    """Steps every tensor the kernel takes (Note [which tensors the kernel takes]) with one kernel
    call per momentum storage; returns the positions of the others (all of them if the kernel
    can't be built), for the caller to step another way. The caller hands in CPU tensors with a
    `KernelLayout`; the choice here is made from dtypes and storages alone, so a compiled step
    makes it while tracing."""
    if not available():
        return list(range(len(params)))
    plain, by_codec, left = [], {}, []
    for i, (p, m) in enumerate(zip(params, exp_avgs)):  # (a gradient always has its parameter's dtype)
        if isinstance(m, Tensor) and m.dtype is p.dtype and p.dtype in _DTYPES:  # the usual case, kept cheap
            plain.append(i)
        elif (number := _codec_number(p, m)) is not None:
            by_codec.setdefault(number, []).append(i)
        else:
            left.append(i)
    if plain:
        by_codec.setdefault(PLAIN, []).extend(plain)
    # lr is read from a tensor, so that a tensor lr (a compiled step's scheduler) is never a constant
    lr = lr if isinstance(lr, Tensor) or not by_codec else torch.tensor(lr, dtype=torch.float64)
    for number, take in by_codec.items():
        def pick(xs):  # (all taken, the usual case: the lists as they are)
            return xs if len(take) == len(params) else [xs[i] for i in take]

        momenta = pick(exp_avgs)
        if number == PLAIN:
            stored, scales, keys = momenta, [], ([], [], [])
        else:  # (StoredMomentum.key's parts: the kernel mixes each key with its new step count)
            stored = [m.stored[0] for m in momenta]
            scales = [m.stored[1] for m in momenta] if len(momenta[0].stored) > 1 else []
            keys = ([m.salt for m in momenta], [m.seed for m in momenta], [m.offset for m in momenta])
        torch.ops.blockopt.adam_mini_step(
            pick(params), pick(grads), stored, pick(exp_avg_sqs), pick(steps), *kernel_args(pick(layouts)),
            lr, beta1, beta2, eps, [float(wd) for wd in pick(weight_decays)], maximize, number, scales, *keys,
        )
    return left
