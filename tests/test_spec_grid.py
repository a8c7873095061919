import pytest
import torch

from quantkern import QuantSpec, grid


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, 4.0, True, "4"])
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("gs", [0, -2, 3.5])
def test_bad_group_size_rejected(gs):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=gs)


def test_bad_damp_rejected():
    with pytest.raises(ValueError, match="damp"):
        QuantSpec(damp=float("nan"))
    with pytest.raises(ValueError, match="damp"):
        QuantSpec(damp=-0.1)


def test_num_groups_ragged():
    assert QuantSpec(group_size=128).num_groups(576) == 5
    assert QuantSpec(group_size=-1).num_groups(576) == 1
    g = grid.group_index(576, QuantSpec(group_size=128))
    assert g[-1].item() == 4 and (g == 4).sum().item() == 576 - 512


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_is_nearest_point_of_its_grid(bits, sym, rng):
    spec = QuantSpec(bits=bits, group_size=24, sym=sym)
    w = torch.randn(13, 100, generator=rng)
    codes, scales, zeros, g_idx = grid.rtn(w, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= spec.maxq
    assert torch.equal(scales, scales.half().float()), "scales must be fp16-representable"
    assert (zeros >= 1).all() and (zeros <= spec.maxq).all()
    if sym:
        assert (zeros == 2 ** (bits - 1)).all()
    deq = grid.dequantize_groups(codes, scales, zeros, g_idx)
    # every element is within half a step of its group's grid (the range covers all weights), up to the
    # fp16 rounding of the scale (relative 2^-11), which moves the extreme levels by |w| * 2^-11
    step = scales[g_idx.long()].t()
    assert ((deq - w).abs() <= step / 2 + w.abs() * 2.0**-11 * 1.01 + 1e-7).all()
    # and no other level is closer: compare against the two neighbouring levels
    for d in (-1, 1):
        alt = (codes.float() + d).clamp(0, spec.maxq)
        alt_w = grid.dequantize_groups(alt, scales, zeros, g_idx)
        assert ((alt_w - w).abs() >= (deq - w).abs() - 1e-6).all()


def test_asym_group_with_zero_minimum_keeps_zero_point_storable():
    w = torch.tensor([[0.0, 0.5, 1.0, 2.0]])
    scale, zero = grid.find_params(w, bits=2, sym=False)
    assert zero.item() >= 1
    q = grid.quantize(w, scale[:, None], zero[:, None], 3)
    back = grid.dequantize(q, scale[:, None], zero[:, None])
    assert (back - w).abs().max() <= scale.item() / 2 + 1e-6


def test_all_zero_row_gets_a_valid_grid():
    scale, zero = grid.find_params(torch.zeros(3, 8), bits=4, sym=False)
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_rtn_rejects_nan_and_inf():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        grid.rtn(w, QuantSpec())
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        grid.rtn(w, QuantSpec())
