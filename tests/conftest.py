"""Fixtures shared by the whole test tree."""

import os

import pytest
import torch

# Without a GPU, the Triton kernels are tested in Triton's interpreter, on CPU tensors
# (tests/optim/test_fused_cuda.py). Triton decides at import whether to interpret, and torch
# imports it early (with torch._dynamo), so the choice is made here, before anything else runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from OpenMP threads (a second one only adds synchronisation), and
    one thread stays fast when other jobs share the CPU. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
