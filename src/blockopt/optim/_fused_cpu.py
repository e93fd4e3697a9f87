"""The fused CPU step of Adam-mini: one C++ kernel call per step for a whole list of tensors.

The kernel (``csrc/adam_mini_cpu.cpp``) is compiled with ``torch.utils.cpp_extension`` the first
time it is needed and cached in the torch extensions directory (``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``): the first build takes about 15 s on two cores,
loading it from the cache well under a second. Without a compiler, or when the build fails, one
warning is shown and every step runs batched.

Note [which tensors the kernel takes]: dense contiguous CPU tensors of float32, float64, bfloat16
or float16 whose blocks are contiguous ranges of units along a run of consecutive dims: rows,
heads, whole, fused row or column segments, experts (``block_dims=(0, 1)``), columns of an
``(in, out)`` weight, and the per-coordinate rule (as plain Adam). Everything else, and every
step that must reduce block sums across ranks first (``reduce_block_sums``), runs batched.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..partition import BlockSpec
from ._batched import batched_adam_mini

_SOURCE = Path(__file__).parent / "csrc" / "adam_mini_cpu.cpp"
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # subclasses (DTensor, ...) dispatch elsewhere

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


class _Layout:
    """A spec as the kernel reads it: the tensor viewed as (outer, units, inner); block b owns
    units ``bounds[b]:bounds[b+1]``. ``bounds`` is ``None`` for the per-coordinate rule."""

    __slots__ = ("outer", "inner", "bounds")

    def __init__(self, outer: int, inner: int, bounds: Tensor | None):
        self.outer, self.inner, self.bounds = outer, inner, bounds


@functools.lru_cache(maxsize=None)
def _layout_of(shape: tuple[int, ...], block_dims: tuple[int, ...], segments: tuple[tuple[int, int], ...]) -> _Layout | None:
    numel = math.prod(shape)
    n_blocks = sum(units // per_block for units, per_block in segments)
    if numel == 0:
        return None
    if n_blocks == numel:
        return _Layout(1, 1, None)
    if block_dims and list(block_dims) != list(range(block_dims[0], block_dims[-1] + 1)):
        return None  # blocks index non-adjacent dims: not ranges of units
    first = block_dims[0] if block_dims else len(shape)
    last = block_dims[-1] + 1 if block_dims else len(shape)
    sizes = [per_block for units, per_block in segments for _ in range(units // per_block)]
    bounds = torch.tensor([0, *sizes], dtype=torch.int64).cumsum_(0)
    return _Layout(math.prod(shape[:first]), math.prod(shape[last:]), bounds)


def _layout(spec: BlockSpec) -> _Layout | None:
    return _layout_of(spec.shape, spec.block_dims, spec.segments)


@torch.compiler.disable
def fused_adam_mini(params, grads, exp_avgs, exp_avg_sqs, steps, specs, *, lr, beta1, beta2, eps,
                    weight_decays, maximize, reduce_block_sums, sq_sums=None) -> None:
    """Adam-mini with the fused CPU kernel for every tensor it takes (see the note above); the
    rest, if any, runs batched. Same signature and results as `_reference_adam_mini`."""
    layouts = [_layout(spec) if isinstance(spec, BlockSpec) else None for spec in specs]
    # The kernel sums and updates each block in one pass: it can't wait for other ranks' sums.
    take = [] if reduce_block_sums is not None or sq_sums is not None else [
        i for i, (p, layout) in enumerate(zip(params, layouts)) if layout is not None and p.is_cpu and type(p) in _PLAIN
    ]
    op = kernel() if take else None
    left = range(len(params))
    if op is not None:
        picked = [layouts[i] for i in take]
        mutated = [[xs[i] for i in take] for xs in (params, exp_avgs, exp_avg_sqs, steps)]
        skipped = op(
            mutated[0], [grads[i] for i in take], *mutated[1:],
            [layout.bounds for layout in picked], [layout.outer for layout in picked], [layout.inner for layout in picked],
            lr, beta1, beta2, eps, [float(weight_decays[i]) for i in take], maximize,
        )
        # the kernel writes through raw pointers: tell autograd about the parameters, as an
        # in-place op would (the state tensors are the optimizer's own)
        torch.autograd.graph.increment_version(mutated[0])
        left = sorted(set(left).difference(take).union(take[j] for j in skipped))
    if left:
        def pick(xs):
            return [xs[i] for i in left]

        batched_adam_mini(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), pick(specs), lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decays=pick(weight_decays), maximize=maximize, reduce_block_sums=reduce_block_sums,
            sq_sums=None if sq_sums is None else pick(sq_sums),
        )
