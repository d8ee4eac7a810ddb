import pytest
import torch

from ioattn.kernels import configs


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN: an element the kernel does not write fails the test."""
    configs.poison_outputs = True
    yield
    configs.poison_outputs = False


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
