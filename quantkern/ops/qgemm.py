"""y = x @ dequant(W)^T (+ bias) over packed GPTQ weights: one op, one backend per device kind.

Backend contract (one object per backend name: "reference", "cpu", "triton", "cuda"):

    prepare(t, bits) -> layout   t = GPTQ v1 tensors (qweight, qzeros, scales, g_idx) on the target device;
                                 builds the backend's kernel-native layout once (at load time)
    run(x, layout, bias) -> y    y = x @ W^T (+ bias); x [..., n], y [..., m], y.dtype == x.dtype

Backends call `register_qgemm_backend(name, backend)` when their module is imported. `qgemm()` validates
the inputs, picks a backend the way registry.choose does (x.device, then QUANTKERN_BACKEND), prepares the
layout unless given one, and runs. `prepare()` returns a `Prepared` that remembers which backend built it,
so callers (QuantLinear) can cache it per backend and device.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..formats import gptq
from . import registry
from .. import _ext, kernels

OP = "qgemm"
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@runtime_checkable
class QGemmBackend(Protocol):
    def prepare(self, t: dict, bits: int) -> object: ...

    def run(self, x: torch.Tensor, prepared: object, bias: torch.Tensor | None) -> torch.Tensor: ...


_BACKENDS: dict[str, QGemmBackend] = {}


def register_qgemm_backend(name: str, backend: QGemmBackend) -> QGemmBackend:
    """Make `backend` the qgemm implementation for `name` (one of registry.BACKENDS)."""
    if not (callable(getattr(backend, "prepare", None)) and callable(getattr(backend, "run", None))):
        raise TypeError(f"qgemm backend {name!r} must have prepare(t, bits) and run(x, prepared, bias)")
    registry.register(OP, name)(backend)  # validates the name; lets registry.choose see it
    _BACKENDS[name] = backend
    return backend


def get_backend(name: str) -> QGemmBackend:
    if name not in _BACKENDS:
        raise KeyError(f"no qgemm backend {name!r} registered (have {sorted(_BACKENDS)})")
    return _BACKENDS[name]


def choose_backend(device: torch.device) -> str:
    return registry.choose(OP, torch.device(device))


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A backend's kernel-native layout of one packed weight, with what it was built from."""

    backend: str
    bits: int
    m: int  # out features
    n: int  # in features
    device: torch.device
    layout: object


def _tensors_device(t: dict) -> torch.device:
    devices = {t[k].device for k in gptq.TENSOR_NAMES}
    if len(devices) != 1:
        raise ValueError(f"GPTQ tensors are on different devices: {sorted(str(d) for d in devices)}")
    return devices.pop()


def _check_usable(name: str, device: torch.device) -> None:
    if name not in _BACKENDS:
        raise KeyError(f"no qgemm backend {name!r} registered (have {sorted(_BACKENDS)})")
    if not registry._usable(name, device):
        raise RuntimeError(
            f"qgemm backend {name!r} cannot run on {device.type} tensors: {registry.backends()[name]['reason']}"
        )


def prepare(t: dict, bits: int, backend: str | None = None) -> Prepared:
    """Validate GPTQ tensors and build the chosen backend's layout on their device."""
    if not isinstance(t, dict) or any(k not in t for k in gptq.TENSOR_NAMES):
        raise ValueError(f"qgemm: t must be a dict with {gptq.TENSOR_NAMES}")
    device = _tensors_device(t)
    name = backend or choose_backend(device)
    _check_usable(name, device)
    m, n, _ = gptq.check_tensors(t, bits)
    return Prepared(name, bits, m, n, device, _BACKENDS[name].prepare(t, bits))


def _check_x(x: torch.Tensor, n: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"qgemm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"qgemm: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"qgemm: x has shape {tuple(x.shape)}; its last dim must be in_features={n}")
    if x.device != device:
        raise ValueError(f"qgemm: x is on {x.device} but the weight is on {device}")


def _check_bias(bias: torch.Tensor | None, m: int, device: torch.device) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError("qgemm: bias must be a floating-point tensor or None")
    if bias.shape != (m,):
        raise ValueError(f"qgemm: bias has shape {tuple(bias.shape)}, expected ({m},)")
    if bias.device != device:
        raise ValueError(f"qgemm: bias is on {bias.device} but the weight is on {device}")


def qgemm(
    x: torch.Tensor,
    t: dict | None,
    bits: int,
    bias: torch.Tensor | None = None,
    prepared: Prepared | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x @ dequant(t)^T (+ bias). Pass `prepared` (from prepare()) to skip building the layout."""
    if prepared is None:
        if t is None:
            raise ValueError("qgemm: give the GPTQ tensors t or a prepared layout")
        prepared = prepare(t, bits, backend)
    elif not isinstance(prepared, Prepared):
        raise TypeError(f"qgemm: prepared must come from quantkern.ops.qgemm.prepare(), got {type(prepared).__name__}")
    elif backend is not None and backend != prepared.backend:
        raise ValueError(f"qgemm: prepared was built by backend {prepared.backend!r}, not {backend!r}")
    if prepared.bits != bits:
        raise ValueError(f"qgemm: prepared layout is {prepared.bits}-bit, called with bits={bits}")
    _check_x(x, prepared.n, prepared.device)
    _check_bias(bias, prepared.m, prepared.device)
    _check_usable(prepared.backend, x.device)
    y = _BACKENDS[prepared.backend].run(x, prepared.layout, bias)
    return y


class ReferenceBackend:
    """Dequantize once to dense fp32 [m, n]; F.linear in fp32; cast to x.dtype (the ground truth)."""

    def prepare(self, t: dict, bits: int) -> torch.Tensor:
        return gptq.dequantize(t, bits)

    def run(self, x: torch.Tensor, prepared: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x.float(), prepared, None if bias is None else bias.float())
        return y.to(x.dtype)


class CpuBackend:
    """C++ kernels (csrc/cpu/qgemm*.cpp) on the layout of formats/native.py.

    Each call runs the kernel quantkern.kernels picks for its batch (decode GEMVs up to 8 tokens, panel
    kernels above), bits, ISA and the QUANTKERN_* switches; `kernel=` names one (tests, benchmarks).
    QUANTKERN_CPU_INT8_ACT=1 opts in to the int8-activation VNNI GEMV for 4-bit decode: faster, but x is
    rounded to int8 per 32 channels (relative error ~1e-3, not the exact fp32 path).
    """

    def prepare(self, t: dict, bits: int):
        from ..formats import native

        return native.cpu_layout(t, bits)

    def run(self, x: torch.Tensor, prepared, bias: torch.Tensor | None, kernel: str | None = None) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"qgemm cpu backend: x is on {x.device}; the CPU kernels need CPU tensors")
        L = prepared
        x2 = x.reshape(-1, L.n)
        name = kernel or kernels.cpu_qgemm(L.bits, x2.shape[0], L.x_index.shape[0])
        y = torch.ops.quantkern.qgemm_cpu(x2, L.qw, L.sc, L.kb_start, L.x_index, L.bits, L.m, bias, name)
        return y.view(*x.shape[:-1], L.m)

    def bind(self, prepared):
        """run(x, prepared, bias) as a closure over the layout, for callers that validated once (QuantLinear's
        lean decode path): the same op call with the attribute and dispatch lookups done up front."""
        op = torch.ops.quantkern.qgemm_cpu.default
        L = prepared
        qw, sc, kbs, xi, bits, m, n = L.qw, L.sc, L.kb_start, L.x_index, L.bits, L.m, L.n
        kpad = xi.shape[0]
        pick = kernels.cpu_qgemm

        def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            x2 = x.reshape(-1, n)
            return op(x2, qw, sc, kbs, xi, bits, m, bias, pick(bits, x2.shape[0], kpad)).view(*x.shape[:-1], m)

        return run

    def query(self, layout, batch: int, dtype: torch.dtype, device: torch.device) -> kernels.Query:
        """What the kernel choice depends on: in_features is the layout's padded width."""
        L = layout
        return kernels.Query("qgemm", "cpu", L.bits, batch, dtype, L.x_index.shape[0], L.m, device)


def query(prepared: Prepared, batch: int, dtype: torch.dtype, device: torch.device) -> kernels.Query:
    """The kernel-table query of running `prepared` on `batch` rows of `dtype` (quantkern.explain)."""
    b = _BACKENDS[prepared.backend]
    if hasattr(b, "query"):
        return b.query(prepared.layout, batch, dtype, device)
    return kernels.Query(OP, prepared.backend, prepared.bits, batch, dtype, prepared.n, prepared.m, device)


def bind(backend: str, prepared: Prepared):
    """A closure y = f(x, bias) running `prepared` on `backend` with no per-call validation (the caller
    checked x and the layout once); backends without their own bind() get run() wrapped."""
    b = _BACKENDS[backend]
    if hasattr(b, "bind"):
        return b.bind(prepared.layout)
    layout = prepared.layout
    return lambda x, bias: b.run(x, layout, bias)


register_qgemm_backend("reference", ReferenceBackend())
if _ext.has_cpu():
    register_qgemm_backend("cpu", CpuBackend())

    @torch.library.register_fake("quantkern::qgemm_cpu")
    def _qgemm_cpu_fake(x, qw, sc, kb_start, x_index, bits, m, bias, kernel):
        return x.new_empty((x.shape[0], m))
