"""The fused CPU step of Adam-mini: one C++ kernel call per step for a whole list of tensors.

The kernel (``csrc/adam_mini_cpu.cpp``) is compiled with ``torch.utils.cpp_extension`` the first
time it is needed and cached in the torch extensions directory (``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``): the first build takes about 15 s on two cores,
loading it from the cache well under a second. Without a compiler, or when the build fails, one
warning is shown and every step runs batched.

Note [which tensors the kernel takes]: dense contiguous CPU tensors of float32, float64, bfloat16
or float16 whose blocks are contiguous ranges of units along a run of consecutive dims
(`KernelLayout`): rows, heads, whole, fused row or column segments, experts
(``block_dims=(0, 1)``), columns of an ``(in, out)`` weight, and the per-coordinate rule (as
plain Adam). Everything else, and every step whose block sums were summed across ranks first
(``sq_sums``), runs batched (`fused.fused_adam_mini` sees to that).
"""

from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).parent / "csrc" / "adam_mini_cpu.cpp"

# Seconds the last `kernel()` call spent building or loading the extension (for benchmarks).
load_seconds: float | None = None


def _build_flags() -> tuple[str, list[str], list[str]]:
    """Extension name, compiler flags and linker flags for this CPU and this torch.

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


@functools.cache
def kernel():
    """The compiled ``adam_mini_step`` op, or ``None`` (after one warning) if it can't be built."""
    global load_seconds
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        name, cflags, ldflags = _build_flags()
        cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
                           is_python_module=False)
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, loudly once
        lines = str(error).splitlines()
        reason = next((line for line in lines if "error" in line.lower() and "Error building" not in line), lines[-1] if lines else "")
        warnings.warn(
            f"blockopt: could not build the fused CPU Adam-mini kernel ({type(error).__name__}: {reason.strip()}); "
            "steps run the batched implementation instead. Install a C++ compiler and `ninja` for the fast path.",
            RuntimeWarning, stacklevel=2,
        )
        return None
    load_seconds = time.perf_counter() - start
    return torch.ops.blockopt.adam_mini_step


def available() -> bool:
    """Whether the fused CPU kernel can run here (builds it on first call)."""
    return kernel() is not None


def handles(p: Tensor) -> bool:
    return p.is_cpu


def step(params, grads, exp_avgs, exp_avg_sqs, steps, layouts, *, lr, beta1, beta2, eps, weight_decays, maximize) -> list[int]:
    """Steps every tensor the kernel takes (see the note above) with one kernel call; returns the
    positions of the others (all of them if the kernel can't be built), for the caller to step
    another way."""
    op = kernel()
    if op is None:
        return list(range(len(params)))
    skipped = op(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps),
        [layout.bounds for layout in layouts], [layout.outer for layout in layouts], [layout.inner for layout in layouts],
        lr, beta1, beta2, eps, [float(wd) for wd in weight_decays], maximize,
    )
    # the kernel writes through raw pointers: tell autograd about the parameters, as an in-place
    # op would (the state tensors are the optimizer's own)
    skipped_set = set(skipped)
    torch.autograd.graph.increment_version([p for i, p in enumerate(params) if i not in skipped_set])
    return list(skipped)
