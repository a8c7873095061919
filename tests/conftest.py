import os

import pytest
import torch

# Solver maths is fp32 everywhere; TF32 would change codes on GPUs.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % (2**31)
    return torch.Generator().manual_seed(seed)

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. Triton reads this when a kernel
# is defined, so it is set before any test imports quantkern.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
