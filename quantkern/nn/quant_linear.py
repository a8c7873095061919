"""QuantLinear: nn.Linear with a packed GPTQ v1 weight, run through the qgemm dispatcher.

The state_dict is the on-disk GPTQ format (qweight, qzeros, scales, g_idx, bias). The kernel-native
layout of the chosen backend is built lazily on first use and cached (not persisted); the cache key
includes the buffers' storage and version counters, so .to(device), load_state_dict and in-place copies
all trigger a rebuild (replacing a buffer's `.data` directly is not seen by the lean path below: assign
the buffer or copy into it).

forward() has a lean path for decode, where a 135M model makes ~200 small calls per token: the first
call validates everything (qgemm.qgemm) and remembers what it checked; later calls re-check only what
can change cheaply (the buffers' version counters, the input's width, dtype and device, the
QUANTKERN_BACKEND override; replacing a buffer resets it through __setattr__) and go straight to the
backend. Members of a FusedGroup (quantkern.nn.fused) hand their call to the group, which runs the
whole group as one kernel call.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from .. import switches
from ..formats import bitstream, gptq
from ..ops import qgemm as _qgemm
from ..spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class CachedLayout:
    """A backend's layout of the buffers, with the buffers' identity and versions it was built from."""

    key: tuple
    prepared: _qgemm.Prepared


@dataclasses.dataclass(frozen=True, slots=True)
class LeanPath:
    """What the first validated call checked, so later calls re-check only what can change cheaply."""

    buffers: tuple  # the layout's buffers (the same objects)
    backend_env: str | bytes | None  # QUANTKERN_BACKEND as it was (switches.backend_raw)
    device: torch.device
    in_shape: torch.Size  # (in_features,)
    versions: int  # version_sum(buffers)
    run: Callable  # the backend's bound kernel: run(x, bias)


@dataclasses.dataclass(frozen=True, slots=True)
class GroupSlot:
    """This layer is member `index` of a FusedGroup."""

    group: object
    index: int


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
                 device=None, dtype: torch.dtype = torch.float16):
        """An empty (all-zero codes) layer of the given shape, ready for load_state_dict."""
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"QuantLinear: spec must be a QuantSpec, got {type(spec).__name__}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"QuantLinear: features must be positive, got in={in_features}, out={out_features}")
        if dtype not in _qgemm.ACT_DTYPES:
            raise TypeError(f"QuantLinear: dtype (of scales and bias) must be a float dtype, got {dtype}")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        n, m, bits, G = in_features, out_features, spec.bits, spec.num_groups(in_features)
        i32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(bitstream.packed_rows(n, bits), m, **i32))
        # empty layer: symmetric zero point 2^(bits-1) everywhere (v1 stores zero - 1)
        mid = torch.full((m, G), (1 << (bits - 1)) - 1, dtype=torch.int64, device=device)
        qzeros = bitstream.pack_dim0(mid, bits).t().contiguous()
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", torch.ones(G, m, dtype=dtype, device=device))
        g_idx = torch.arange(n, device=device, dtype=torch.int32) // spec.group_len(n)
        self.register_buffer("g_idx", g_idx.to(torch.int32))
        self.register_buffer("bias", torch.zeros(m, dtype=dtype, device=device) if bias else None)
        self._cache: dict[str, CachedLayout] = {}
        self._fast: LeanPath | None = None
        self._group: GroupSlot | None = None  # once quantkern.nn.fused groups this layer with others
        self.last_backend: str | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_gptq(cls, tensors: dict, spec: QuantSpec, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap GPTQ v1 tensors (qweight, qzeros, scales, g_idx) quantized with `spec`."""
        try:
            m, n, G = gptq.check_tensors(tensors, spec.bits)
        except ValueError as exc:
            raise ValueError(f"QuantLinear.from_gptq: tensors do not match {spec.bits}-bit spec: {exc}") from exc
        if G != spec.num_groups(n):
            raise ValueError(
                f"QuantLinear.from_gptq: {G} groups in scales, but group_size={spec.group_size} with "
                f"in_features={n} gives {spec.num_groups(n)}"
            )
        dev = tensors["qweight"].device
        layer = cls(n, m, spec, bias=bias is not None, device=dev, dtype=tensors["scales"].dtype
                    if tensors["scales"].dtype in _qgemm.ACT_DTYPES else torch.float16)
        for k in gptq.TENSOR_NAMES:
            setattr(layer, k, tensors[k].detach().clone().contiguous())
        if bias is not None:
            if bias.shape != (m,):
                raise ValueError(f"QuantLinear.from_gptq: bias has shape {tuple(bias.shape)}, expected ({m},)")
            layer.bias = bias.detach().to(device=dev, dtype=layer.scales.dtype).clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, result) -> "QuantLinear":
        """From an nn.Linear and its quantkern.solve result (anything with .to_gptq() and .spec)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        spec = getattr(result, "spec", None)
        if not isinstance(spec, QuantSpec) or not callable(getattr(result, "to_gptq", None)):
            raise TypeError("QuantLinear.from_linear: result must have .spec (QuantSpec) and .to_gptq()")
        t = result.to_gptq()
        m, n, _ = gptq.check_tensors(t, spec.bits)
        if (m, n) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"QuantLinear.from_linear: result is for a [{m}, {n}] weight, linear is "
                f"[{linear.out_features}, {linear.in_features}]"
            )
        t = {k: v.to(linear.weight.device) for k, v in t.items()}
        return cls.from_gptq(t, spec, None if linear.bias is None else linear.bias)

    # ---- running ------------------------------------------------------------------------------
    def _key(self) -> tuple:
        ts = [self.qweight, self.qzeros, self.scales, self.g_idx]
        return tuple((t.device, t.data_ptr(), t._version, t.dtype) for t in ts)

    def prepared(self, backend: str | None = None) -> _qgemm.Prepared:
        """The backend's native layout of this weight, built once and cached until the buffers change."""
        backend = backend or _qgemm.choose_backend(self.qweight.device)
        key = self._key()
        hit = self._cache.get(backend)
        if hit is None or hit.key != key:
            t = {k: getattr(self, k) for k in gptq.TENSOR_NAMES}
            hit = self._cache[backend] = CachedLayout(key, _qgemm.prepare(t, self.spec.bits, backend))
        return hit.prepared

    def layout_buffers(self) -> tuple:
        """The buffers the kernel layout is built from (the bias is read per call)."""
        b = self._buffers
        return b["qweight"], b["qzeros"], b["scales"], b["g_idx"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self._group
        if slot is not None:
            return slot.group.run(slot.index, x)
        fast = self._fast
        if (fast is not None and type(x) is torch.Tensor and x.shape[-1:] == fast.in_shape
                and x.dtype in _qgemm.ACT_DTYPES and x.device == fast.device
                and switches.backend_raw() == fast.backend_env and version_sum(fast.buffers) == fast.versions):
            return fast.run(x, self._buffers["bias"])
        return self._forward_checked(x)

    def _forward_checked(self, x: torch.Tensor) -> torch.Tensor:
        """The fully validated call; on success it arms the lean path for the next calls."""
        if isinstance(x, torch.Tensor) and x.device != self.qweight.device:
            raise ValueError(f"QuantLinear: input is on {x.device} but the layer is on {self.qweight.device}")
        env = switches.backend_raw()
        backend = _qgemm.choose_backend(x.device)
        self.last_backend = backend
        prep = self.prepared(backend)
        y = _qgemm.qgemm(x, None, self.spec.bits, bias=self.bias, prepared=prep)
        refs = self.layout_buffers()
        self._fast = LeanPath(refs, env, x.device, torch.Size([self.in_features]), version_sum(refs),
                              _qgemm.bind(backend, prep))
        return y

    def invalidate(self) -> None:
        """Forget the lean path's checks (and the group's layout): the next call validates again."""
        d = self.__dict__
        d["_fast"] = None
        if d.get("_group") is not None:
            d["_group"].group.invalidate()

    def __setattr__(self, name, value):
        if name in _LAYOUT_NAMES:  # a buffer replaced (setattr, load_state_dict(assign=True)): re-check
            self.invalidate()
        super().__setattr__(name, value)

    def dequantized_weight(self) -> torch.Tensor:
        """Dense fp32 [out, in] weight (for checks and fallbacks)."""
        return gptq.dequantize({k: getattr(self, k) for k in gptq.TENSOR_NAMES}, self.spec.bits)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # layouts live on the old device
        self.invalidate()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.spec
        try:
            backend = self.last_backend or _qgemm.choose_backend(self.qweight.device)
        except Exception:  # no usable backend: say so instead of failing repr
            backend = "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, sym={s.sym}, act_order={s.act_order}, bias={self.bias is not None}, "
            f"backend={backend}"
        )


_LAYOUT_NAMES = frozenset(("qweight", "qzeros", "scales", "g_idx", "bias"))


def version_sum(tensors) -> int:
    """Sum of the tensors' version counters: counters only grow, so an equal sum means no in-place change."""
    v = 0
    for t in tensors:
        v += t._version
    return v
