import os
import zlib

import pytest
import torch

# Solver maths is fp32 everywhere; TF32 would change codes on GPUs.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def rng(request):
    """A generator per test, seeded from the test's id (crc32: stable across processes, unlike hash())
    so a failure reproduces; QUANTKERN_TEST_SEED=k draws a different set of inputs for every test."""
    salt = int(os.environ.get("QUANTKERN_TEST_SEED", "0"))
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ salt)

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. Triton reads this when a kernel
# is defined, so it is set before any test imports quantkern.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
