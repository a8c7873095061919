"""GPTQ v1 layout: bit-exact against a hand decoder, round trips, C++ == reference, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import quantkern
from quantkern import QuantSpec, grid
from quantkern.formats import bitstream, gptq
from quantkern.ops import registry

BITS = [2, 3, 4, 8]


def random_layer(m, n, bits, group_size, g, sym=True, act_order=False):
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    w = torch.randn(m, n, generator=g)
    codes, scales, zeros, g_idx = grid.rtn(w, spec)
    if act_order:  # a non-monotone g_idx, as act-order produces
        perm = torch.randperm(n, generator=g)
        g_idx = g_idx[perm]
        codes = codes[:, perm]
    return codes, scales, zeros, g_idx


# --- a literal decoder written from the GPTQ-for-LLaMa description, independent of bitstream.py ---
def hand_decode_column(words, bits):
    """Codes of one packed column (list of uint32 words)."""
    out = []
    if bits in (2, 4, 8):
        per = 32 // bits
        for w in words:
            out += [(w >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
        return out
    assert bits == 3
    words = list(words) + [0] * (-len(words) % 3)  # a ragged tail is zero-padded to whole 3-word chunks
    for k in range(0, len(words), 3):
        w0, w1, w2 = words[k : k + 3]
        out += [(w0 >> (3 * j)) & 7 for j in range(10)]
        out.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))  # value 10: 2 bits in word0, 1 in word1
        out += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
        out.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))  # value 21: 1 bit in word1, 2 in word2
        out += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
    return out


@pytest.mark.parametrize("bits", BITS)
def test_layout_matches_hand_decoder(bits):
    g = torch.Generator().manual_seed(bits)
    codes, scales, zeros, g_idx = random_layer(40, 64, bits, 32, g, sym=False)
    t = gptq.pack(codes, scales, zeros, g_idx, bits)
    assert t["qweight"].shape == (64 * bits // 32, 40) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (2, bitstream.packed_rows(40, bits)) and t["scales"].dtype == torch.float16
    qw = (t["qweight"].to(torch.int64) & 0xFFFFFFFF).tolist()
    for col in (0, 17, 39):
        assert hand_decode_column([row[col] for row in qw], bits)[:64] == codes[col].tolist()
    qz = (t["qzeros"].to(torch.int64) & 0xFFFFFFFF).tolist()
    for grp in range(2):
        stored = hand_decode_column(qz[grp], bits)[:40]
        assert stored == (zeros[grp].long() - 1).tolist(), "qzeros must store zero - 1 (v1)"


def test_four_bit_word_by_hand():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)  # one output row, 8 inputs
    t = gptq.pack(codes, torch.ones(1, 1), torch.full((1, 1), 8.0), torch.zeros(8, dtype=torch.int32), 4)
    assert t["qweight"].flatten().tolist() == [int.from_bytes(bytes.fromhex("87654321"), "big") - (1 << 32)]
    assert t["qzeros"].flatten().tolist() == [7]  # zero 8 stored as 7


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m,n,gs", [(1, 1, -1), (33, 96, 32), (70, 100, 32), (5, 576, 128), (64, 200, 64), (31, 37, 7)])
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_exact(bits, m, n, gs, sym):
    g = torch.Generator().manual_seed(m * 1000 + n + bits)
    codes, scales, zeros, g_idx = random_layer(m, n, bits, gs, g, sym=sym, act_order=(n % 2 == 0))
    t = gptq.pack(codes, scales, zeros, g_idx, bits)
    c2, s2, z2, g2 = gptq.unpack(t, bits)
    assert torch.equal(c2, codes)
    assert torch.equal(z2, zeros.to(torch.int32))
    assert torch.equal(s2.float(), scales)  # scales were fp16-representable already
    assert torch.equal(g2, g_idx)
    # the checkpoint dict dequantizes back to the reference weights exactly
    assert torch.equal(gptq.dequantize(t, bits), grid.dequantize_groups(codes, scales, zeros, g_idx))


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    m=st.integers(1, 70),
    n=st.integers(1, 150),
    gs=st.sampled_from([-1, 1, 5, 32, 64, 128]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(bits, m, n, gs, seed):
    g = torch.Generator().manual_seed(seed)
    codes, scales, zeros, g_idx = random_layer(m, n, bits, gs, g, sym=bool(seed % 2), act_order=bool(seed % 3 == 0))
    t = gptq.pack(codes, scales, zeros, g_idx, bits)
    c2, _, z2, g2 = gptq.unpack(t, bits)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros.to(torch.int32)) and torch.equal(g2, g_idx)


@pytest.mark.skipif(not quantkern.backends()["cpu"]["available"], reason="C++ extension not built")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,m", [(1, 1), (32, 8), (95, 33), (1000, 130)])
def test_cpp_pack_bit_exact_with_reference(bits, n, m):
    g = torch.Generator().manual_seed(n + m + bits)
    codes = torch.randint(0, 1 << bits, (n, m), generator=g)
    ref = registry.implementation("pack_dim0", "reference")(codes, bits)
    cpp = registry.implementation("pack_dim0", "cpu")(codes, bits)
    assert torch.equal(ref, cpp)
    assert torch.equal(registry.implementation("unpack_dim0", "cpu")(cpp, bits, n), codes.to(torch.uint8))
    assert torch.equal(registry.implementation("unpack_dim0", "reference")(cpp, bits, n), codes.to(torch.uint8))


@pytest.mark.skipif(not quantkern.backends()["cpu"]["available"], reason="C++ extension not built")
def test_cpp_op_errors_and_fake_kernel():
    with pytest.raises(RuntimeError, match="bits must be"):
        torch.ops.quantkern.pack_dim0(torch.zeros(4, 4, dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.quantkern.pack_dim0(torch.full((4, 4), 16, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.quantkern.unpack_dim0(torch.zeros(5, 4, dtype=torch.int32), 4, 64)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.quantkern.pack_dim0(torch.empty(100, 7, dtype=torch.int32), 3)
        assert out.shape == (12, 7) and out.dtype == torch.int32


# --- bad input -------------------------------------------------------------------------------
def _good(bits=4):
    g = torch.Generator().manual_seed(0)
    return random_layer(8, 64, bits, 32, g)


def test_pack_rejects_bad_input():
    codes, scales, zeros, g_idx = _good()
    with pytest.raises(ValueError, match="bits"):
        gptq.pack(codes, scales, zeros, g_idx, 5)
    with pytest.raises(ValueError, match="non-integer"):
        gptq.pack(codes.float() + 0.5, scales, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="out of range"):
        gptq.pack(codes.int() + 16, scales, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="out of range"):
        gptq.pack(codes.int() - 20, scales, zeros, g_idx, 4)
    with pytest.raises(TypeError, match="integer tensor"):
        gptq.pack(codes.bool(), scales, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="scales must be"):
        gptq.pack(codes, scales[:, :3], zeros, g_idx, 4)
    with pytest.raises(ValueError, match="zeros must match"):
        gptq.pack(codes, scales, zeros[:1], g_idx, 4)
    with pytest.raises(ValueError, match="g_idx"):
        gptq.pack(codes, scales, zeros, g_idx[:-1], 4)
    with pytest.raises(ValueError, match="g_idx"):
        gptq.pack(codes, scales, zeros, g_idx + 5, 4)
    with pytest.raises(ValueError, match="zero point 0"):
        gptq.pack(codes, scales, torch.zeros_like(zeros), g_idx, 4)
    bad_scales = scales.clone()
    bad_scales[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite positive"):
        gptq.pack(codes, bad_scales, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="2-D"):
        gptq.pack(codes[0], scales, zeros, g_idx, 4)


def test_unpack_rejects_mismatched_tensors():
    codes, scales, zeros, g_idx = _good()
    t = gptq.pack(codes, scales, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="qweight shape"):
        gptq.unpack(t, 3)  # wrong bits for this checkpoint
    with pytest.raises(ValueError, match="int32"):
        gptq.unpack({**t, "qweight": t["qweight"].to(torch.int64)}, 4)
    with pytest.raises(ValueError, match="missing"):
        gptq.unpack({k: v for k, v in t.items() if k != "qzeros"}, 4)
    with pytest.raises(ValueError, match="qweight shape"):
        gptq.unpack({**t, "g_idx": torch.zeros(200, dtype=torch.int32)}, 4)
    with pytest.raises(ValueError, match="expected 9"):
        gptq.check_tensors(t, 4, m=9)


@pytest.mark.parametrize("bits,n,rows", [(4, 8, 1), (4, 40, 5), (2, 16, 1), (8, 4, 1), (3, 32, 3), (3, 64, 6), (3, 40, 4)])
def test_packed_rows_match_gptq_shapes(bits, n, rows):
    """GPTQ's qweight has n*bits/32 rows; ragged n gets the minimal zero-padded word count."""
    assert bitstream.packed_rows(n, bits) == rows
    codes = torch.randint(0, 1 << bits, (n, 3))
    assert gptq._pack_ops.pack_dim0(codes, bits).shape == (rows, 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [5, 32, 77])
def test_qzeros_v1_v2_conversion(bits, m, rng):
    """gptq_v2 stores the zero point itself: converting v1 -> v2 adds one to every stored zero (words
    straddled at 3 bits included), v2 -> v1 takes it back, and a zero no format can hold is refused."""
    maxq, G, n = (1 << bits) - 1, 3, 40
    zeros = torch.randint(1, maxq + 1, (G, m), generator=rng)
    codes = torch.randint(0, maxq + 1, (m, n), generator=rng)
    scales = torch.rand(G, m, generator=rng) + 0.1
    g_idx = torch.arange(n) % G
    v1 = gptq.pack(codes, scales, zeros, g_idx, bits)
    v2 = gptq.convert_qzeros(v1, bits, "gptq", "gptq_v2")
    stored = bitstream.unpack_dim0(v2["qzeros"].t().contiguous(), bits, m).t()
    assert torch.equal(stored.long(), zeros)  # v2: the zero itself
    assert all(torch.equal(v2[k], v1[k]) for k in ("qweight", "scales", "g_idx"))
    assert torch.equal(gptq.convert_qzeros(v2, bits, "gptq_v2", "gptq")["qzeros"], v1["qzeros"])
    assert gptq.convert_qzeros(v1, bits, "gptq", "gptq") is v1
    # a zero of 0 is fine in v2 and refused on the way to v1, naming the zero and the format
    z0 = zeros.clone()
    z0[1, m // 2] = 0
    v2_zero = {**v2, "qzeros": bitstream.pack_dim0(z0.t().contiguous(), bits).t().contiguous()}
    with pytest.raises(ValueError, match=r"zero point of 0 cannot be stored as 'gptq'"):
        gptq.convert_qzeros(v2_zero, bits, "gptq_v2", "gptq")
    # v1 can hold maxq + 1 (stored maxq), v2 cannot
    z_hi = torch.full((G, m), maxq + 1)
    v1_hi = {**v1, "qzeros": bitstream.pack_dim0((z_hi - 1).t().contiguous(), bits).t().contiguous()}
    with pytest.raises(ValueError, match=rf"zero point of {maxq + 1} cannot be stored as 'gptq_v2'"):
        gptq.convert_qzeros(v1_hi, bits, "gptq", "gptq_v2")
    with pytest.raises(ValueError, match="unknown GPTQ checkpoint_format 'gptq_v3'"):
        gptq.convert_qzeros(v1, bits, "gptq", "gptq_v3")


def test_v1_asym_wrapped_zero_is_refused(rng):
    """A v1 asymmetric checkpoint whose stored zero is maxq came from a zero point of 0 (0 - 1 wrapped):
    refused, not read as maxq + 1; legal v1 zeros pass."""
    bits, m, G, n = 4, 40, 2, 64
    zeros = torch.randint(1, 16, (G, m), generator=rng)
    t = gptq.pack(torch.randint(0, 16, (m, n), generator=rng), torch.rand(G, m, generator=rng) + 0.1, zeros,
                  torch.arange(n) // 32, bits)
    gptq.check_v1_asym_zeros(t, bits)
    stored = zeros - 1
    stored[1, 7] = 15
    t["qzeros"] = bitstream.pack_dim0(stored.t().contiguous(), bits).t().contiguous()
    with pytest.raises(ValueError, match="zero point of 0 wrapped around"):
        gptq.check_v1_asym_zeros(t, bits)
