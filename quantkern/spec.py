"""QuantSpec: what grid a weight is quantized onto, and the knobs every solver shares (the method configs in
quantkern.methods extend it with each method's own options)."""
from __future__ import annotations

import dataclasses
import math

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A uniform integer grid with per-group scale and zero point (the GPTQ quantizer).

    bits:          2, 3, 4 or 8.
    group_size:    -1 for one group per output row, else the number of input channels per group;
                   a ragged last group is allowed (group of channel j is j // group_size).
    sym:           symmetric grid (zero = 2^(bits-1)) or asymmetric (zero from min/max).
    act_order:     process input channels by descending diag(H) (GPTQ "desc_act").
    static_groups: group parameters from the original weights in original order (GPTQ), so act-order
                   needs no g_idx lookups at inference.
    damp:          relative Hessian damping, lambda * mean(diag H).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{type(self).__name__}: bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or not (
            self.group_size == -1 or self.group_size > 0
        ):
            raise ValueError(f"{type(self).__name__}: group_size must be -1 or a positive int, got {self.group_size!r}")
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp >= 0):
            raise ValueError(f"{type(self).__name__}: damp must be a finite number >= 0, got {self.damp!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_len(self, n: int) -> int:
        """Columns per group for a layer with n input channels."""
        return n if self.group_size == -1 else self.group_size

    def num_groups(self, n: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(n / self.group_size)

    def replace(self, **changes) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
