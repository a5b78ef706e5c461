"""Fixtures shared by the test files (plain builders are in ``helpers.py``)."""

import pytest
import threadpoolctl
import torch


@pytest.fixture(scope="module")
def single_threaded():
    """One thread per library: the test machine's two cores are shared, and oversubscribed OpenMP / BLAS thread
    pools (torch, faiss, numpy) slow these small workloads down tenfold under load.

    Module-scoped; a test file opts in with ``pytestmark = pytest.mark.usefixtures("single_threaded")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)
