import pytest
import torch

import quantkern
from quantkern.ops import registry


def test_backends_report_every_backend_with_a_reason():
    b = quantkern.backends()
    assert set(b) == {"cuda", "triton", "cpu", "reference"}
    for name, info in b.items():
        assert isinstance(info["available"], bool) and info["reason"], name
    assert b["reference"]["available"]


def test_cpu_backend_is_built():
    """The package is meant to ship compiled C++ kernels: a missing build is a failure, not a skip."""
    b = quantkern.backends()
    assert b["cpu"]["available"], b["cpu"]["reason"]
    assert registry.choose("pack_dim0", torch.device("cpu")) == "cpu"


def test_forcing_a_backend(monkeypatch):
    monkeypatch.setenv("QUANTKERN_BACKEND", "reference")
    assert registry.choose("pack_dim0", torch.device("cpu")) == "reference"
    monkeypatch.setenv("QUANTKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="QUANTKERN_BACKEND"):
        registry.choose("pack_dim0", torch.device("cpu"))


def test_forcing_an_unusable_backend_is_a_clear_error(monkeypatch):
    registry.register("_test_op", "cuda")(lambda: None)
    registry.register("_test_op", "reference")(lambda: "ref")
    monkeypatch.setenv("QUANTKERN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run _test_op on cpu"):
        registry.choose("_test_op", torch.device("cpu"))
    monkeypatch.delenv("QUANTKERN_BACKEND")
    assert registry.call("_test_op", torch.device("cpu")) == "ref"
