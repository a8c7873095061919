"""`gguf_blocks.npz`: the GGUF block bytes of a checkpoint's GGUF-grid linears (which no GPTQ tensor can hold:
see gguf_solve), one uint8 array [rows, bytes] per module plus their types. Not a .safetensors file, so
that checkpoint loaders which read every *.safetensors in the directory do not take it for weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIDECAR = "gguf_blocks.npz"
_KINDS = "__kinds__"


def save_sidecar(path, blocks: dict) -> Path:
    """Write {module name: (kind, block bytes uint8 [rows, bytes])} into the checkpoint directory `path`."""
    out = Path(path) / SIDECAR
    kinds = np.frombuffer(json.dumps({n: k for n, (k, _) in blocks.items()}).encode(), dtype=np.uint8)
    with open(out, "wb") as f:
        np.savez(f, **{n: np.ascontiguousarray(b, dtype=np.uint8) for n, (_, b) in blocks.items()}, **{_KINDS: kinds})
    return out


def load_sidecar(path) -> dict:
    """{module name: (kind, block bytes uint8 numpy [rows, bytes])} of a checkpoint directory (empty if none)."""
    f = Path(path) / SIDECAR
    if not f.exists():
        return {}
    with np.load(f, allow_pickle=False) as z:
        kinds = json.loads(bytes(z[_KINDS]).decode())
        return {n: (k, z[n]) for n, k in kinds.items()}
