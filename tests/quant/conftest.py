"""Quantization tests run tiny models: one thread is as fast and does not stall when other work shares the CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
