"""Every QUANTKERN_* run-time switch, declared and read here and nowhere else.

Switches are read at each call (not cached), so tests and benchmarks can flip them between calls.
The C++ kernels read no environment: Python picks a kernel by name (quantkern.kernels) and passes it
down. One exception, kept in C++ because it tunes a launch inside one kernel and only benchmarks set
it: QUANTKERN_CUDA_MMA_BLOCKS_PER_SM (csrc/cuda/qgemm_launch.cpp). Build, test and cache settings
(QUANTKERN_NO_CUDA in setup.py, QUANTKERN_TEST_SEED in tests/conftest.py, QUANTKERN_CACHE in
models/zoo.py, QUANTKERN_PEERS_PYTHON in the interop tests) are not kernel switches and stay with
their readers.

A flag is on when set to anything but "" or "0"; unset, it takes its default.
"""
from __future__ import annotations

import dataclasses
import os

_env = os.environ


@dataclasses.dataclass(frozen=True)
class Switch:
    name: str
    kind: str  # "flag" | "int" | "choice"
    default: object
    doc: str


SWITCHES: dict[str, Switch] = {s.name: s for s in (
    Switch("QUANTKERN_BACKEND", "choice", None,
           "force a backend for every op that has it: reference | cpu | triton | cuda"),
    Switch("QUANTKERN_NO_AVX2", "flag", False,
           "CPU kernels as if the CPU had no AVX2 (nor anything wider): the portable scalar kernels run"),
    Switch("QUANTKERN_NO_AVX512", "flag", False,
           "CPU kernels as if the CPU had no AVX-512 (nor AMX): the AVX2 kernels run"),
    Switch("QUANTKERN_NO_AMX", "flag", False, "never run the AMX-INT8 qgemm kernel"),
    Switch("QUANTKERN_CPU_INT8_ACT", "flag", False,
           "opt in to the int8-activation VNNI GEMV for 4-bit decode (approximate, rel. err ~5e-3)"),
    Switch("QUANTKERN_CUDA_GEMV_MAX_BATCH", "int", 8, "CUDA qgemm: the GEMV kernel up to this many rows"),
    Switch("QUANTKERN_CUDA_MMA", "flag", True, "CUDA qgemm: the tensor-core kernel may run (0 turns it off)"),
    Switch("QUANTKERN_CUDA_MMA_MAX_BATCH", "int", 128, "CUDA qgemm: the tensor-core kernel up to this many rows"),
    Switch("QUANTKERN_TRITON_AUTOTUNE", "flag", True, "Triton qgemm: autotune block sizes (0: fixed defaults)"),
)}


def flag(name: str) -> bool:
    v = _env.get(name)
    if v is None:
        return bool(SWITCHES[name].default)
    return v not in ("", "0")


def integer(name: str) -> int:
    v = _env.get(name)
    if v is None or v.strip() == "":
        return int(SWITCHES[name].default)
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not an integer ({SWITCHES[name].doc})") from None


def raw(name: str) -> str | None:
    """The variable as set (None if unset): for callers that only need to notice a change."""
    if name not in SWITCHES:
        raise KeyError(f"{name} is not a declared quantkern switch")
    return _env.get(name)




def backend() -> str | None:
    """QUANTKERN_BACKEND, normalized (None when unset or empty); the caller validates the name."""
    v = _env.get("QUANTKERN_BACKEND", "").strip().lower()
    return v or None


# The per-call read of the CPU switches (every qgemm call on the decode path) looks them up in the bytes
# dict behind os.environ on POSIX CPython (os.environ[...] = ... and monkeypatch.setenv update it): a
# plain dict lookup, where os.environ.get encodes the key and decodes the value (measured ~4x the cost).
_CPU_KEYS = ("QUANTKERN_NO_AVX2", "QUANTKERN_NO_AVX512", "QUANTKERN_NO_AMX", "QUANTKERN_CPU_INT8_ACT")
_raw = getattr(_env, "_data", None)
if not (os.name == "posix" and isinstance(_raw, dict) and all(isinstance(k, bytes) for k in list(_raw)[:1])):
    _raw = None
_OFF = (None, b"", b"0")


def cpu_state() -> tuple[bool, bool, bool, bool]:
    """(no_avx2, no_avx512, no_amx, int8_act): everything the CPU kernel choice reads from the
    environment, as one cache key (read at each call)."""
    d = _raw
    if d is None:
        return tuple(_env.get(k, "") not in ("", "0") for k in _CPU_KEYS)  # type: ignore[return-value]
    return (d.get(b"QUANTKERN_NO_AVX2") not in _OFF, d.get(b"QUANTKERN_NO_AVX512") not in _OFF,
            d.get(b"QUANTKERN_NO_AMX") not in _OFF, d.get(b"QUANTKERN_CPU_INT8_ACT") not in _OFF)


def describe() -> list[tuple[str, str, str]]:
    """(name, value as set or 'unset (default ...)', doc) for every switch."""
    out = []
    for s in SWITCHES.values():
        v = _env.get(s.name)
        out.append((s.name, repr(v) if v is not None else f"unset (default {s.default})", s.doc))
    return out


def backend_raw() -> str | bytes | None:
    """QUANTKERN_BACKEND exactly as set (bytes where the fast lookup below applies), only to notice a
    change between calls (QuantLinear's lean path)."""
    return _env.get("QUANTKERN_BACKEND") if _raw is None else _raw.get(b"QUANTKERN_BACKEND")
