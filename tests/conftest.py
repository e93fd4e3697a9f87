"""Fixtures shared by the whole test tree."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from OpenMP threads (a second one only adds synchronisation), and
    one thread stays fast when other jobs share the CPU. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
