"""Shared by the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Exact output comparisons on one thread: other tests (training with train.threads)
    change torch's global thread count, and a different count sums in another order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
