"""QuantLinear: construction, forward vs the reference, state_dict round trip, layout cache, bad input."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from torch import nn

import quantkern
from quantkern import grid
from quantkern.formats import gptq
from quantkern.nn import QuantLinear
from quantkern.ops import qgemm as Q
from quantkern.spec import QuantSpec

from qgemm_cases import random_layer, rel_err

M, N = 72, 200


@dataclasses.dataclass
class FakeResult:  # duck type of quantkern.solve's result
    spec: QuantSpec
    tensors: dict

    def to_gptq(self) -> dict:
        return self.tensors


def rtn_result(linear: nn.Linear, spec: QuantSpec) -> FakeResult:
    codes, scales, zeros, g_idx = grid.rtn(linear.weight.detach().float(), spec)
    return FakeResult(spec, gptq.pack(codes, scales, zeros, g_idx, spec.bits))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_from_gptq_forward_matches_reference(bits, act_order):
    spec = QuantSpec(bits=bits, group_size=32, sym=False, act_order=act_order)
    t = random_layer(M, N, spec, seed=bits)
    bias = torch.randn(M)
    layer = QuantLinear.from_gptq(t, spec, bias=bias)
    x = torch.randn(5, N)
    ref = Q.qgemm(x, t, bits, bias=layer.bias, backend="reference")
    y = layer(x)
    assert y.shape == (5, M) and rel_err(y, ref) < 1e-5
    torch.testing.assert_close(layer.dequantized_weight(), gptq.dequantize(t, bits))


def test_from_linear_close_to_linear():
    torch.manual_seed(0)
    linear = nn.Linear(N, M)
    spec = QuantSpec(bits=4, group_size=64)
    layer = QuantLinear.from_linear(linear, rtn_result(linear, spec))
    x = torch.randn(3, N)
    assert rel_err(layer(x), linear(x)) < 0.2  # 4-bit RTN, bias kept
    assert layer.bias is not None and layer.in_features == N and layer.out_features == M


def test_state_dict_round_trip_and_cache_rebuild(monkeypatch):
    spec = QuantSpec(bits=3, group_size=48, sym=False, act_order=True)
    t = random_layer(M, N, spec, seed=1)
    src = QuantLinear.from_gptq(t, spec, bias=torch.randn(M))
    assert set(src.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    dst = QuantLinear(N, M, spec, bias=True)
    x = torch.randn(4, N)
    y_empty = dst(x)  # builds and caches a layout of the empty weights
    assert rel_err(y_empty, x @ dst.dequantized_weight().T + dst.bias.float()) < 1e-5
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    torch.testing.assert_close(dst(x), src(x))  # cache rebuilt after load_state_dict
    monkeypatch.setenv("QUANTKERN_BACKEND", "reference")
    assert rel_err(dst(x), src(x)) < 1e-5 and dst.last_backend == "reference"


def test_to_dtype_keeps_codes_and_clears_cache():
    spec = QuantSpec(bits=4, group_size=32)
    layer = QuantLinear.from_gptq(random_layer(M, N, spec, seed=2), spec)
    x = torch.randn(2, N)
    y = layer(x)
    layer.to("cpu")
    assert layer._cache == {} and layer.qweight.dtype == torch.int32
    torch.testing.assert_close(layer(x), y)
    for dt in (torch.bfloat16, torch.float16):
        assert layer(x.to(dt)).dtype == dt


def test_extra_repr():
    layer = QuantLinear(N, M, QuantSpec(bits=2, group_size=64, act_order=True), bias=False)
    r = repr(layer)
    for s in ("in_features=200", "out_features=72", "bits=2", "group_size=64", "sym=True", "act_order=True",
              "backend="):
        assert s in r
    assert quantkern.QuantLinear is QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_empty_layer_shapes_match_packed_format(bits):
    spec = QuantSpec(bits=bits, group_size=128)
    layer = QuantLinear(N, M, spec, bias=False)
    assert gptq.check_tensors({k: getattr(layer, k) for k in gptq.TENSOR_NAMES}, bits) == (M, N, 2)
    _, _, zeros, _ = gptq.unpack({k: getattr(layer, k) for k in gptq.TENSOR_NAMES}, bits)
    assert (zeros == 1 << (bits - 1)).all()


def test_bad_inputs():
    spec = QuantSpec(bits=4, group_size=32)
    t = random_layer(M, N, spec, seed=3)
    with pytest.raises(ValueError, match="do not match 3-bit"):
        QuantLinear.from_gptq(t, spec.replace(bits=3))
    with pytest.raises(ValueError, match="groups"):
        QuantLinear.from_gptq(t, spec.replace(group_size=64))
    with pytest.raises(ValueError, match="bias has shape"):
        QuantLinear.from_gptq(t, spec, bias=torch.randn(M + 1))
    with pytest.raises(ValueError, match="linear is"):
        QuantLinear.from_linear(nn.Linear(N + 1, M), FakeResult(spec, t))
    with pytest.raises(TypeError, match="to_gptq"):
        QuantLinear.from_linear(nn.Linear(N, M), object())
    with pytest.raises(TypeError, match="QuantSpec"):
        QuantLinear(N, M, {"bits": 4})
    layer = QuantLinear.from_gptq(t, spec)
    with pytest.raises(ValueError, match="in_features=200"):
        layer(torch.randn(3, N - 1))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        layer(torch.randn(3, N).double())
    with pytest.raises(ValueError, match="input is on meta"):
        layer(torch.randn(3, N, device="meta"))
