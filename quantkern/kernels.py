"""The kernel table: every qgemm and solver kernel, what it supports, and the one selector over it.

Each backend of an op (quantkern.ops.registry picks the backend: device, then QUANTKERN_BACKEND) has
one or more kernels. A Kernel row declares what it supports (bit widths, a batch range, activation
dtypes, the CPU ISA or GPU it needs, the weight layout it reads) and the switch that turns it off (or,
for an opt-in kernel, on). `select()` walks the rows of one op and backend in priority order and takes
the first that applies, keeping the reason each other row was skipped; `quantkern.explain` prints that.
The C++ ops take the chosen kernel's name (csrc/cpu/qgemm.cpp, csrc/cpu/solver.cpp) and refuse a name
the CPU cannot run, so the kernel selected is the kernel that runs. docs/kernels.md shows the table.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from . import _ext, switches

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ALL_BITS = (2, 3, 4, 8)
CPU_LAYOUT = "cpu-native (16-row tiles, 32-channel k-blocks, bit planes at 2/3 bits)"
GPU_LAYOUT = "gpu-native (GPTQ v1 words, gathered channels)"

# CPU ISA levels: a switch turns off its level and every level above it (a CPU without AVX2 has no
# AVX-512 either), so QUANTKERN_NO_AVX2=1 leaves the portable scalar kernels.
_ISA_SWITCHES = {
    "avx2": ("QUANTKERN_NO_AVX2",),
    "avx512": ("QUANTKERN_NO_AVX2", "QUANTKERN_NO_AVX512"),
    "avx512vnni": ("QUANTKERN_NO_AVX2", "QUANTKERN_NO_AVX512"),
    "amx": ("QUANTKERN_NO_AVX2", "QUANTKERN_NO_AVX512", "QUANTKERN_NO_AMX"),
}
_ISA_WORDS = {"avx2": "AVX2 + FMA + F16C", "avx512": "AVX-512 F/BW/VL", "avx512vnni": "AVX-512 VNNI",
              "amx": "AMX-INT8 + GFNI (and the OS granting the tile state)"}
AMX_MAX_K1 = 8192  # AMX at 1 token only up to this many (padded) input channels: the LUT GEMV was faster beyond


@dataclasses.dataclass(frozen=True)
class Query:
    """What the choice depends on. batch = rows of x (tokens); in_features = the layout's padded
    input width on the CPU; beams = K of ksnrq_solve."""

    op: str
    backend: str
    bits: int
    batch: int = 1
    dtype: torch.dtype = F32
    in_features: int = 0
    out_features: int = 0
    device: torch.device = torch.device("cpu")
    beams: int = 1


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    op: str  # "qgemm" | "gptq_block_solve" | "ksnrq_solve"
    backend: str  # "cpu" | "cuda" | "triton" | "reference"
    bits: tuple[int, ...] = ALL_BITS
    batch: tuple[int, int | str | None] = (1, None)  # rows of x it is picked for; a str names an int switch
    dtypes: tuple[torch.dtype, ...] = (F32, BF16, F16)
    isa: str = "generic"  # CPU: generic | avx2 | avx512 | avx512vnni | amx; GPU: what it needs, in words
    layout: str = ""
    switch: str | None = None  # the QUANTKERN_* flag that turns it off (on, if opt_in)
    opt_in: bool = False
    when: Callable[[Query], str | None] | None = None  # a further rule: why not, or None
    doc: str = ""

    def max_batch(self) -> int | None:
        hi = self.batch[1]
        return switches.integer(hi) if isinstance(hi, str) else hi

    def batch_text(self) -> str:
        lo, hi = self.batch
        if hi is None:
            return f">= {lo}" if lo > 1 else "any"
        return f"{lo}..{self.max_batch()} (${hi})" if isinstance(hi, str) else f"{lo}..{hi}"


def _amx_when(q: Query) -> str | None:
    if q.batch == 1 and q.in_features > AMX_MAX_K1:
        return f"1 token on rows of {q.in_features} > {AMX_MAX_K1} channels (the LUT GEMV is faster there)"
    return None


def _m4(q: Query) -> str | None:
    return None if q.out_features % 4 == 0 else f"out_features={q.out_features} is not a multiple of 4"


def _cc80(q: Query) -> str | None:
    if q.device.type == "cuda" and _cc_major(q.device.index or 0) < 8:
        return "needs compute capability >= 8.0 (mma.sync, cp.async)"
    return _m4(q)


@functools.lru_cache(maxsize=None)
def _cc_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


_D = 8  # tokens the CPU GEMV kernels are picked for (decode); above, the panel kernels (prefill)
TABLE: tuple[Kernel, ...] = (
    # ---- qgemm, CPU (csrc/cpu/qgemm*.cpp) ---------------------------------------------------------
    Kernel("qgemm_int8_avx512vnni", "qgemm", "cpu", (4,), (1, _D), isa="avx512vnni", layout=CPU_LAYOUT,
           switch="QUANTKERN_CPU_INT8_ACT", opt_in=True,
           doc="vpdpbusd GEMV, x rounded to int8 per 32 channels (approximate, rel. err ~5e-3)"),
    Kernel("qgemm_digits_avx512vnni", "qgemm", "cpu", (4,), (1, 4), isa="avx512vnni", layout=CPU_LAYOUT,
           doc="vpdpbusd GEMV, x as 3 int8 digit planes (22-bit fixed point: fp32 accuracy)"),
    Kernel("qgemm_amx", "qgemm", "cpu", (2, 3), (1, _D), isa="amx", layout=CPU_LAYOUT, switch="QUANTKERN_NO_AMX",
           when=_amx_when, doc="AMX-INT8 tile GEMV, x as 3 digit planes per run of <= 128 channels"),
    Kernel("qgemm_lut_avx512", "qgemm", "cpu", (2, 3), (1, 2), isa="avx512", layout=CPU_LAYOUT,
           doc="LUT GEMV on bit planes: 16 subset sums of x per 4 channels"),
    Kernel("qgemm_gemv_avx512", "qgemm", "cpu", ALL_BITS, (1, _D), isa="avx512", layout=CPU_LAYOUT,
           doc="fp32 FMA GEMV, codes to floats by vpermps"),
    Kernel("qgemm_gemv_avx2", "qgemm", "cpu", ALL_BITS, (1, _D), isa="avx2", layout=CPU_LAYOUT,
           doc="fp32 FMA GEMV, two 8-lane halves per 16-row tile"),
    Kernel("qgemm_gemv_generic", "qgemm", "cpu", ALL_BITS, (1, _D), layout=CPU_LAYOUT,
           doc="portable scalar GEMV (no SIMD intrinsics)"),
    Kernel("qgemm_panel_avx512", "qgemm", "cpu", ALL_BITS, (1, None), isa="avx512", layout=CPU_LAYOUT,
           doc="prefill: dequantize 1 MiB fp32 panels of W^T, at::mm per panel"),
    Kernel("qgemm_panel_avx2", "qgemm", "cpu", ALL_BITS, (1, None), isa="avx2", layout=CPU_LAYOUT,
           doc="prefill: dequantize 1 MiB fp32 panels of W^T, at::mm per panel"),
    Kernel("qgemm_panel_generic", "qgemm", "cpu", ALL_BITS, (1, None), layout=CPU_LAYOUT,
           doc="prefill: portable scalar dequantizer, at::mm per panel"),
    # ---- qgemm, CUDA (csrc/cuda/qgemm*.cu; ops/qgemm_gpu.py) ----------------------------------------
    Kernel("cuda_gemv", "qgemm", "cuda", ALL_BITS, (1, "QUANTKERN_CUDA_GEMV_MAX_BATCH"), isa="any CUDA GPU",
           layout=GPU_LAYOUT, when=_m4, doc="fp32-FMA GEMV"),
    Kernel("cuda_mma", "qgemm", "cuda", (2, 3, 4), (1, "QUANTKERN_CUDA_MMA_MAX_BATCH"), (BF16, F16),
           isa="sm_80+", layout=GPU_LAYOUT, switch="QUANTKERN_CUDA_MMA", when=_cc80,
           doc="fused dequant + mma.sync m16n8k16 tensor-core GEMM"),
    Kernel("cuda_dequant_matmul", "qgemm", "cuda", ALL_BITS, isa="any CUDA GPU", layout=GPU_LAYOUT, when=_m4,
           doc="W^T dequantized to x's dtype by a CUDA kernel, then torch matmul"),
    Kernel("cuda_dequant_linear", "qgemm", "cuda", ALL_BITS, isa="any CUDA GPU", layout=GPU_LAYOUT,
           doc="any width: dequantize in torch, F.linear"),
    # ---- qgemm, Triton and the reference ------------------------------------------------------------
    Kernel("triton_qgemm", "qgemm", "triton", ALL_BITS, isa="CUDA GPU or TRITON_INTERPRET=1", layout=GPU_LAYOUT,
           doc="fused unpack + tl.dot (autotuned unless QUANTKERN_TRITON_AUTOTUNE=0)"),
    Kernel("reference_qgemm", "qgemm", "reference", ALL_BITS, layout="GPTQ v1 (dequantized once to fp32)",
           doc="pure torch: fp32 F.linear on the dequantized weight (the ground truth)"),
    # ---- solvers (csrc/cpu/solver.cpp, csrc/cuda/solver*.cu, triton/solver.py, ops/solver.py) -------
    Kernel("gptq_block_avx512", "gptq_block_solve", "cpu", isa="avx512", dtypes=(F32,), layout="fp32 rows",
           doc="64-row tiles, AVX-512 rank-1 and lazy updates"),
    Kernel("gptq_block_avx2", "gptq_block_solve", "cpu", isa="avx2", dtypes=(F32,), layout="fp32 rows",
           doc="64-row tiles, AVX2 rank-1 and lazy updates"),
    Kernel("gptq_block_generic", "gptq_block_solve", "cpu", dtypes=(F32,), layout="fp32 rows",
           doc="portable scalar loops, bit-identical to the SIMD kernels"),
    Kernel("gptq_cuda", "gptq_block_solve", "cuda", isa="any CUDA GPU", dtypes=(F32,), layout="fp32 rows", doc="CUDA kernel"),
    Kernel("gptq_triton", "gptq_block_solve", "triton", isa="CUDA GPU or TRITON_INTERPRET=1", dtypes=(F32,), layout="fp32 rows",
           doc="Triton kernel"),
    Kernel("gptq_reference", "gptq_block_solve", "reference", dtypes=(F32,), layout="fp32 rows", doc="pure torch"),
    Kernel("ksnrq_avx512", "ksnrq_solve", "cpu", isa="avx512", dtypes=(F32,), layout="fp32 rows",
           doc="K-beam search; vpermps beam reorder when K divides 16"),
    Kernel("ksnrq_avx2", "ksnrq_solve", "cpu", isa="avx2", dtypes=(F32,), layout="fp32 rows",
           doc="K-beam search; AVX2 greedy children"),
    Kernel("ksnrq_generic", "ksnrq_solve", "cpu", dtypes=(F32,), layout="fp32 rows", doc="portable scalar loops"),
    Kernel("ksnrq_reference", "ksnrq_solve", "reference", dtypes=(F32,), layout="fp32 rows", doc="pure torch"),
)
BY_NAME: dict[str, Kernel] = {k.name: k for k in TABLE}
assert len(BY_NAME) == len(TABLE), "kernel names must be unique"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The kernel chosen for a query and why every other candidate of its op and backend was not."""

    query: Query
    kernel: Kernel
    skipped: tuple[tuple[Kernel, str], ...]

    def lines(self) -> list[str]:
        q = self.query
        head = f"{q.op} on {q.backend}: {self.kernel.name}  ({self.kernel.doc})"
        out = [head]
        for k, why in self.skipped:
            out.append(f"    skipped {k.name}: {why}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# ---- the CPU's side: what is compiled in and what the hardware has (static), switches (per call) ------
@functools.lru_cache(maxsize=None)
def _cpu_hw() -> tuple[dict, dict]:
    info = _ext.build_info()
    hw = {"generic": True, "avx2": info.get("cpu_avx2", False), "avx512": info.get("cpu_avx512", False),
          "avx512vnni": info.get("cpu_avx512vnni", False), "amx": info.get("cpu_amx", False)}
    return hw, dict(info.get("cpu_kernels", {}))


def cpu_isa_off(isa: str) -> str | None:
    """The switch (as 'NAME=value') that turns this CPU ISA level off right now, or None."""
    for name in _ISA_SWITCHES.get(isa, ()):
        if switches.flag(name):
            return f"{name}={switches.raw(name)}"
    return None


def why_not(k: Kernel, q: Query) -> str | None:
    """Why kernel k does not run this query, or None if it does."""
    if k.backend == "cpu":
        hw, compiled = _cpu_hw()
        if k.name not in compiled:
            return "not compiled into this build of the extension"
    if q.bits not in k.bits:
        return f"reads {'/'.join(map(str, k.bits))}-bit weights, not {q.bits}-bit"
    if q.dtype not in k.dtypes:
        return f"takes {'/'.join(str(d).replace('torch.', '') for d in k.dtypes)} activations, not {q.dtype}"
    if k.switch is not None:
        on = switches.flag(k.switch)
        if k.opt_in and not on:
            return f"opt-in: set {k.switch}=1"
        if not k.opt_in and not on and switches.SWITCHES[k.switch].default:
            return f"turned off by {k.switch}={switches.raw(k.switch)!r}"
        if not k.opt_in and on and not switches.SWITCHES[k.switch].default:
            return f"turned off by {k.switch}={switches.raw(k.switch)}"
    if k.backend == "cpu" and k.isa != "generic":
        off = cpu_isa_off(k.isa)
        if off:
            return f"turned off by {off}"
        if not hw[k.isa]:
            return f"needs {_ISA_WORDS[k.isa]}, which this CPU lacks"
    lo, hi = k.batch[0], k.max_batch()
    if q.batch < lo or (hi is not None and q.batch > hi):
        return f"batch {q.batch} outside {k.batch_text()}"
    if k.when is not None:
        return k.when(q)
    return None


def candidates(op: str, backend: str) -> tuple[Kernel, ...]:
    return tuple(k for k in TABLE if k.op == op and k.backend == backend)


def select(q: Query) -> Selection:
    """Walk op/backend's kernels in priority order: the first that applies runs."""
    skipped, chosen = [], None
    for k in candidates(q.op, q.backend):
        why = why_not(k, q)
        if chosen is None and why is None:
            chosen = k
        elif chosen is not None:  # after the choice: why it does not apply, or that it ranks lower
            skipped.append((k, why or f"applies, but {chosen.name} ranks higher"))
        else:
            skipped.append((k, why))
    if chosen is not None:
        return Selection(q, chosen, tuple(skipped))
    raise RuntimeError(f"no {q.backend} kernel of {q.op} runs {q}: " + "; ".join(f"{k.name}: {w}" for k, w in skipped))


def runnable(op: str, bits: int) -> list[str]:
    """The CPU kernels of op that this build and CPU can run at `bits` when named explicitly (the
    switches, batch ranges and preference rules aside): what tests sweep."""
    hw, compiled = _cpu_hw()
    return [k.name for k in candidates(op, "cpu") if k.name in compiled and bits in k.bits and hw[k.isa]]


# ---- the per-call path of the CPU ops: the same select(), memoized on everything it reads -------------
_cpu_memo: dict[tuple, str] = {}


def cpu_qgemm(bits: int, batch: int, in_features: int) -> str:
    """Name of the CPU qgemm kernel for this call (select() memoized: the key holds every input it reads:
    the batch up to the largest batch bound, the AMX width rule, and the CPU switches, read now)."""
    batch = min(max(batch, 1), _D + 1)  # (0 tokens: any kernel; the op returns at once)
    key = (bits, batch, in_features > AMX_MAX_K1, switches.cpu_state())
    name = _cpu_memo.get(key)
    if name is None:
        name = _cpu_memo[key] = select(Query("qgemm", "cpu", bits, batch, F32, in_features)).kernel.name
    return name


def cpu_solver(op: str) -> str:
    """Name of the CPU kernel of a solver op (every solver kernel reads every bit width)."""
    key = (op, switches.cpu_state())
    name = _cpu_memo.get(key)
    if name is None:
        name = _cpu_memo[key] = select(Query(op, "cpu", 4)).kernel.name
    return name


def table_rows() -> list[dict]:
    """The table as plain rows (docs, `quantkern inspect --kernels`)."""
    return [{"name": k.name, "op": k.op, "backend": k.backend, "bits": "/".join(map(str, k.bits)),
             "batch": k.batch_text(), "dtypes": "/".join(str(d).replace("torch.", "") for d in k.dtypes),
             "isa": k.isa, "switch": (("+" if k.opt_in else "-") + k.switch) if k.switch else "", "doc": k.doc}
            for k in TABLE]
