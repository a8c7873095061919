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


@pytest.fixture(params=["avx512", "avx2"])
def isa(request, monkeypatch):
    """Run the test on both CPU kernel paths: AVX-512 where the CPU has it, and AVX2 forced by
    QUANTKERN_NO_AVX512=1 (read by quantkern.switches at each call)."""
    if request.param == "avx2":
        monkeypatch.setenv("QUANTKERN_NO_AVX512", "1")
    else:
        monkeypatch.delenv("QUANTKERN_NO_AVX512", raising=False)
    return request.param


# Without a GPU, Triton kernels run in the interpreter on CPU tensors. Triton reads this when a kernel
# is defined, so it is set before any test imports quantkern.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
