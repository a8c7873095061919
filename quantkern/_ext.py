"""Loads the compiled extension once; remembers why it could not be loaded."""
from __future__ import annotations

import functools

import torch  # noqa: F401  (the extension's op registrations need torch loaded first)

from . import switches

try:
    from . import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def _static_info() -> dict:
    return dict(_C.build_info()) if _C is not None else {}


def build_info() -> dict:
    """How the extension was built and what this CPU has; avx512_kernels / amx_kernels also apply the
    QUANTKERN_NO_* switches as set now (whether those kernels can be chosen)."""
    info = dict(_static_info())
    if info:
        no512 = switches.flag("QUANTKERN_NO_AVX2") or switches.flag("QUANTKERN_NO_AVX512")
        info["avx512_kernels"] = bool(info.get("cpu_avx512")) and not no512
        info["amx_kernels"] = bool(info.get("cpu_amx")) and not no512 and not switches.flag("QUANTKERN_NO_AMX")
    return info


def has_cpu() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_static_info().get("cuda"))
