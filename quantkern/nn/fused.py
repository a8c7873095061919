"""Run QuantLinears that read the same input (q/k/v, gate/up) as one kernel call.

At decode a small model makes hundreds of tiny GEMV calls per token; q/k/v and gate/up read the very
same input tensor, so one call on their weights concatenated along the outputs does the same work
with fewer calls (less per-call overhead, one thread fork/join, better thread balance).

The modules stay as they are (state_dict, names, hooks): `models.fusion.fuse_quant_groups(model)` attaches a
FusedGroup to each group's members. When a member is called, the group checks whether it already
ran on this exact input (same tensor object, unchanged version) and still owes this member its
output: if so the member gets its slice of the cached result, else the group runs the concatenated
weight on the input and caches the result until every member has taken its slice. The concatenated
layout is built lazily per backend from the members' GPTQ tensors and rebuilt when any member's
buffers change. Outputs are bit-identical to the separate calls wherever the kernel computes each
output row independently of the others (every quantkern backend does).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from .. import switches
from ..formats import bitstream
from ..ops import qgemm as _qgemm
from .quant_linear import GroupSlot, QuantLinear, version_sum


@dataclasses.dataclass(frozen=True)
class FusedLayout:
    """The concatenated weight's layout and bias, with the members' buffers it was built from."""

    buffers: tuple  # every member's layout buffers and bias
    versions: int
    backend: str
    device: torch.device
    prepared: _qgemm.Prepared
    bias: torch.Tensor | None


@dataclasses.dataclass(frozen=True, slots=True)
class FusedLean:
    """The group's lean path (see QuantLinear's LeanPath)."""

    buffers: tuple
    versions: int
    backend_env: str | bytes | None
    device: torch.device
    run: Callable
    bias: torch.Tensor | None


def concat_outputs(ts: list[dict], bits: int) -> dict:
    """GPTQ v1 tensors of the weights stacked along the outputs (all must share g_idx)."""
    g_idx = ts[0]["g_idx"]
    if any(not torch.equal(t["g_idx"], g_idx) for t in ts[1:]):
        raise ValueError("concat_outputs: the weights have different g_idx (input channel groups)")
    zeros = [bitstream.unpack_dim0(t["qzeros"].t().contiguous(), bits, t["scales"].shape[1]) for t in ts]  # [m, G]
    return {
        "qweight": torch.cat([t["qweight"] for t in ts], 1).contiguous(),
        "qzeros": bitstream.pack_dim0(torch.cat(zeros, 0), bits).t().contiguous(),
        "scales": torch.cat([t["scales"] for t in ts], 1).contiguous(),
        "g_idx": g_idx.clone(),
    }


class FusedGroup:
    """QuantLinears with the same input width, spec and g_idx, run as one concatenated weight."""

    def __init__(self, members: list[QuantLinear]):
        if len(members) < 2 or not all(isinstance(m, QuantLinear) for m in members):
            raise ValueError("FusedGroup needs two or more QuantLinear modules")
        if len({(m.in_features, m.spec) for m in members}) != 1:
            raise ValueError("FusedGroup: members must share in_features and spec")
        self.members = list(members)
        bounds = [0]
        for m in members:
            bounds.append(bounds[-1] + m.out_features)
        self.bounds = bounds
        self.in_shape = torch.Size([members[0].in_features])
        self._state: FusedLean | None = None
        self._layout: FusedLayout | None = None  # survives invalidate()
        self._x = None  # the input last run, its version, the result, members still owed a slice
        self._xv = -1
        self._y = None
        self._owed: set[int] = set()
        for i, m in enumerate(members):
            m._group = GroupSlot(self, i)

    def detach(self) -> None:
        """Give the members back their own forward."""
        for m in self.members:
            m._group = None
        self._x = self._y = self._state = self._layout = None

    def invalidate(self) -> None:
        self._state = self._layout = None
        self._x = self._y = None

    def _buffers(self) -> tuple:
        """Every member's layout buffers and bias (the concatenated bias is cached with the layout)."""
        out = []
        for m in self.members:
            out.extend(m.layout_buffers())
            if m.bias is not None:
                out.append(m.bias)
        return tuple(out)

    def _prepare(self, x: torch.Tensor, env):
        ms = self.members
        if x.device != ms[0].qweight.device:
            raise ValueError(f"QuantLinear: input is on {x.device} but the layer is on {ms[0].qweight.device}")
        backend = _qgemm.choose_backend(x.device)
        bufs = self._buffers()
        vs = version_sum(bufs)
        lay = self._layout
        if not (lay is not None and lay.backend == backend and lay.device == x.device and lay.versions == vs
                and all(a is b for a, b in zip(lay.buffers, bufs)) and len(lay.buffers) == len(bufs)):
            bits = ms[0].spec.bits
            t = concat_outputs([dict(zip(("qweight", "qzeros", "scales", "g_idx"), m.layout_buffers())) for m in ms],
                               bits)
            prep = _qgemm.prepare(t, bits, backend)
            bias = None
            if any(m.bias is not None for m in ms):
                bias = torch.cat([m.bias if m.bias is not None else m.scales.new_zeros(m.out_features) for m in ms])
            lay = self._layout = FusedLayout(bufs, vs, backend, x.device, prep, bias)
        for m in ms:
            m.last_backend = backend
        self._state = FusedLean(bufs, vs, env, x.device, _qgemm.bind(backend, lay.prepared), lay.bias)
        return lay

    def run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x is self._x and i in self._owed and x._version == self._xv:
            y = self._y
            self._owed.discard(i)
            if not self._owed:
                self._x = self._y = None
            return y[..., self.bounds[i]:self.bounds[i + 1]]
        env = switches.backend_raw()
        st = self._state
        if (st is not None and type(x) is torch.Tensor and x.shape[-1:] == self.in_shape
                and x.dtype in _qgemm.ACT_DTYPES and x.device == st.device and env == st.backend_env
                and version_sum(st.buffers) == st.versions):
            y = st.run(x, st.bias)
        else:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"qgemm: x must be a torch.Tensor, got {type(x).__name__}")
            try:
                lay = self._prepare(x, env)
            except ValueError as exc:
                if "different g_idx" not in str(exc):
                    raise
                self.detach()  # the members no longer share their input channel order: run them apart
                return self.members[i](x)
            y = _qgemm.qgemm(x, None, self.members[0].spec.bits, bias=lay.bias, prepared=lay.prepared)
        self._x, self._xv, self._y = x, x._version, y
        self._owed = set(range(len(self.members))) - {i}
        return y[..., self.bounds[i]:self.bounds[i + 1]]


def fuse_groups(candidates) -> list[FusedGroup]:
    """Attach a FusedGroup to every list of QuantLinears in `candidates` (linears that read the same input; the
    architecture table in quantkern.models.arch names them: models.fusion.fuse_quant_groups). A list whose members
    cannot be fused (different spec, width, device or g_idx, or already fused) keeps running on its own.
    Returns the groups made."""
    groups = []
    for mods in candidates:
        if len(mods) < 2 or not all(isinstance(m, QuantLinear) and m._group is None for m in mods):
            continue
        if len({(m.in_features, m.spec, m.qweight.device) for m in mods}) != 1:
            continue
        if any(not torch.equal(m.g_idx, mods[0].g_idx) for m in mods[1:]):
            continue
        groups.append(FusedGroup(list(mods)))
    return groups


def unfuse_quant_groups(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear) and m._group is not None:
            m._group.group.detach()
