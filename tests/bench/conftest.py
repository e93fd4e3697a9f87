"""Shared by the bench tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from threads, and one thread stays fast when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
