"""Every model of a third-party library (timm or diffusers), planned and checked like the transformers sweep.

    python benchmarks/studies/partition_coverage/third_party.py --stub-torchvision             # results/timm
    python benchmarks/studies/partition_coverage/third_party.py --library diffusers            # results/diffusers

Each model is built at full size on the meta device from the library's own defaults (timm: every
name `timm.list_models()` gives; diffusers: every model class, from its default config), partitioned,
and checked by `blockopt.partition.coverage` (the same invariants as `partition_coverage.py`: head
sizes as each module states them, experts per output neuron, token rows, no matrix in one block,
attention recognised). timm imports torchvision at import time, and PyPI's torchvision does not
load beside this project's CPU build of torch; ``--stub-torchvision`` stands in an empty module
for it (only model classes are built here, no image transforms), so that
``pip install --no-deps timm`` is enough.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import time
import types
import warnings
from collections import Counter
from pathlib import Path

import torch

from blockopt.bench import write_result
from blockopt.partition import coverage

HERE = Path(__file__).resolve().parent


class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty ``torchvision.*`` modules whose every attribute is an inert placeholder."""

    class _Inert:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return self

        def __getattr__(self, name):
            return type(self)()

        def __mro_entries__(self, bases):
            return (object,)

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__version__ = "0.0+stub"

        def inert(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return self._Inert()

        module.__getattr__ = inert
        return module

    def exec_module(self, module):
        pass


def timm_builder(name: str):
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return model, type(model).__name__


def diffusers_builder(name: str):
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, name)()
    return model, name


def _diffusers_models() -> list[str]:
    import diffusers

    names = []
    for name in dir(diffusers):
        try:
            cls = getattr(diffusers, name)
        except Exception:  # (an optional backend missing: that class is not offered)
            continue
        if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) and cls is not diffusers.ModelMixin:
            names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", choices=("timm", "diffusers"), default="timm")
    parser.add_argument("--models", nargs="+", help="model names (default: every one the library offers)")
    parser.add_argument("--stub-torchvision", action="store_true", help="stand in an empty torchvision (see above)")
    parser.add_argument("--out", type=Path, help="the run's folder (default: results/<library>)")
    args = parser.parse_args()
    out = args.out or HERE / "results" / args.library
    if args.stub_torchvision:
        sys.meta_path.insert(0, _StubTorchvision())
    library = __import__(args.library)
    if args.library == "timm":
        names, builder = args.models or library.list_models(), timm_builder
    else:
        names, builder = args.models or _diffusers_models(), diffusers_builder
    rows, t0 = [], time.perf_counter()
    for i, name in enumerate(names, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (diffusers: config attributes read as attributes)
            row = coverage.cover(name, builder=builder,
                                 family_name=name.split("_")[0] if args.library == "timm" else args.library)
        rows.append(row)
        print(f"[{i}/{len(names)}] {name:<45} {row.status:<12} {row.plan_s:6.3f}s"
              + (f"  {row.error[:100]}" if row.error else ""), flush=True)
    totals = coverage.totals(rows)
    families = {status: sorted({r.family for r in rows if r.status == status}) for status in ("silent", "crash")}
    print(totals, families)
    results = {**coverage.sweep_results(rows, time.perf_counter() - t0),
               "architectures": dict(Counter(r.family for r in rows)), "silent_or_crash_architectures": families}
    settings = {"library": args.library, args.library: library.__version__, "torch": torch.__version__, "device": "meta",
                "models": "all" if args.models is None else names}
    if args.library == "timm":
        settings["torchvision"] = "stub" if args.stub_torchvision else "installed"
    path = write_result(out, name=f"partition_coverage_{args.library}", settings=settings, results=results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
