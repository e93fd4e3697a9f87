"""Counting what a step sends: the check behind "one all-reduce per step" (tests, benchmarks)."""

from __future__ import annotations

import torch.distributed as dist


class AllReduceCounter:
    """While active, counts ``torch.distributed.all_reduce`` calls and the bytes they carry::

        with AllReduceCounter() as sent:
            opt.step()
        assert sent.calls == 1
    """

    def __init__(self) -> None:
        self.calls, self.bytes, self._original = 0, 0, None

    def __enter__(self) -> AllReduceCounter:
        self._original = original = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._original
