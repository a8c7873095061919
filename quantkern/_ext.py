"""Loads the compiled extension once; remembers why it could not be loaded."""
from __future__ import annotations

import torch  # noqa: F401  (the extension's op registrations need torch loaded first)

try:
    from . import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def build_info() -> dict:
    return dict(_C.build_info()) if _C is not None else {}


def has_cpu() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(build_info().get("cuda"))
