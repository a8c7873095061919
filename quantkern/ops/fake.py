"""Fake (meta) kernels so the compiled ops trace under torch.compile / FakeTensor."""
from __future__ import annotations

import torch

from .. import _ext


def _register():
    if not _ext.has_cpu():
        return

    @torch.library.register_fake("quantkern::pack_dim0")
    def _(codes, bits):
        n, m = codes.shape
        return codes.new_empty(((n + 31) // 32 * bits, m), dtype=torch.int32)

    @torch.library.register_fake("quantkern::unpack_dim0")
    def _(packed, bits, n):
        return packed.new_empty((n, packed.shape[1]), dtype=torch.uint8)


_register()
