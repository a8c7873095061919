"""Per-call backend choice: CUDA -> Triton -> CPU C++ -> pure-torch reference (DESIGN.md).

Every op registers one function per backend it has. `QUANTKERN_BACKEND=reference|cpu|triton|cuda`
forces a backend: it is used for every op that has it (ops without it keep the normal order).
Reading the variable at each call lets tests switch backends with monkeypatch.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .. import _ext, switches

BACKENDS = ("cuda", "triton", "cpu", "reference")
_IMPLS: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError or a broken install
        return False, f"triton not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        return True, "triton on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1), CPU tensors, slow"
    return False, "triton installed but no CUDA device (set TRITON_INTERPRET=1 to run kernels on CPU)"


def backends() -> dict[str, dict]:
    """Which backends are usable here, and why not."""
    info = _ext.build_info()
    cpu_ok = _ext.has_cpu()
    cuda_built = bool(info.get("cuda"))
    if not cuda_built:
        cuda = (False, "extension built without CUDA kernels" if cpu_ok else "extension not built")
    elif not torch.cuda.is_available():
        cuda = (False, "CUDA kernels compiled, but no CUDA device is visible")
    else:
        cuda = (True, f"CUDA kernels for {info.get('cuda_arch', '?')}")
    tri = _triton_status()
    cpu_reason = (
        f"C++ kernels, {info.get('omp_threads')} threads, ISA {'+'.join(info.get('cpu_isa', []))}"
        if cpu_ok
        else f"extension not loaded ({_ext.LOAD_ERROR})"
    )
    return {
        "cuda": {"available": cuda[0], "reason": cuda[1]},
        "triton": {"available": tri[0], "reason": tri[1]},
        "cpu": {"available": cpu_ok, "reason": cpu_reason},
        "reference": {"available": True, "reason": "pure torch, always"},
    }


def _usable(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and _ext.has_cpu()
    if backend == "cuda":
        return device.type == "cuda" and _ext.has_cuda_kernels()
    if backend == "triton":
        return _triton_status()[0] and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    return False


def forced_backend() -> str | None:
    forced = switches.backend()
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"QUANTKERN_BACKEND={forced!r} is not one of {BACKENDS}")
    return forced


def choose(op: str, device: torch.device) -> str:
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    forced = forced_backend()
    if forced is not None and forced in impls:
        if not _usable(forced, device):
            raise RuntimeError(
                f"QUANTKERN_BACKEND={forced} cannot run {op} on {device.type} tensors: "
                f"{backends()[forced]['reason']}"
            )
        return forced
    # Triton on CPU tensors only when forced (the interpreter is for tests, not speed).
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for backend in order:
        if backend in impls and _usable(backend, device):
            return backend
    raise RuntimeError(f"no usable backend for {op} on {device}")


def call(op: str, device: torch.device, *args, **kwargs):
    return _IMPLS[op][choose(op, device)](*args, **kwargs)


def implementation(op: str, backend: str) -> Callable:
    """The function of one backend (tests compare backends directly)."""
    return _IMPLS[op][backend]
