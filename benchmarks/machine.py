"""What every benchmark result records about the machine it ran on (one place for all benchmarks):
CPU model string, ISA flags, threads, versions, load, the read bandwidth measured in this run, and
which quantkern kernel a call takes.

    from machine import machine_info, kernel
    info = machine_info(contended=True)                  # measures read bandwidth (~1-2 s)
    kernel("qgemm", bits=4, batch=1, in_features=4096)   # -> "cpu:gemv_fma_avx2" on an AVX2-only CPU
"""
from __future__ import annotations

import datetime
import functools
import math
import os
import platform
import re
import sys
import time

import torch

# benchmarks measure the checkout they live in, not whichever quantkern is installed
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# /proc/cpuinfo flags that decide which kernels can run (the full list is long and mostly irrelevant)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx512vbmi", "avx512_vbmi2", "gfni", "amx_tile", "amx_int8", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict:
    """First processor's fields of /proc/cpuinfo ({} where there is none)."""
    out: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, val = line.partition(":")
                out[key.strip()] = val.strip()
    except OSError:
        pass
    return out


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def isa_flags() -> list[str]:
    """The kernel-relevant ISA flags the OS reports for this CPU."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in ISA_FLAGS if f in have]


def llc_bytes() -> int:
    """Size of the largest cache the OS reports for cpu0 (0 if unknown)."""
    base, best = "/sys/devices/system/cpu/cpu0/cache", 0
    try:
        for d in os.listdir(base):
            if d.startswith("index"):
                with open(os.path.join(base, d, "size")) as f:
                    txt = f.read().strip().upper()
                best = max(best, int(txt.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:], 1))
    except (OSError, ValueError):
        pass
    return best


def rotate_bytes() -> int:
    """Distinct input bytes each benchmark case rotates through so every call reads from DRAM: twice the
    reported LLC (a VM may see the whole host's L3), at least 256 MiB."""
    return max(256 * 2**20, 2 * llc_bytes())


def read_bandwidth_gbs(mib: int = 1024, repeats: int = 3, device: str = "cpu") -> dict:
    """STREAM-like read of one buffer well past the LLC, best of `repeats`, at the current thread count:
    torch.sum over `mib` MiB of fp32 (portable), and quantkern's streaming read loop on the same buffer
    where the extension has it (wider loads, several streams per thread: closer to what a GEMV reaches).
    device="cuda": torch.sum on the GPU (its memory bandwidth), timed with a synchronize."""
    mib = max(mib, 2 * llc_bytes() // 2**20)
    t = torch.ones(mib * 2**20 // 4, device=device)
    probes = {"torch_sum": torch.sum}
    if device == "cpu" and hasattr(torch.ops, "quantkern") and hasattr(torch.ops.quantkern, "read_bandwidth_probe"):
        probes["quantkern_probe"] = torch.ops.quantkern.read_bandwidth_probe
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    out = {"device": device, "buffer_mib": mib, "threads": torch.get_num_threads(), "repeats": repeats}
    for name, fn in probes.items():
        fn(t)  # first touch
        best = math.inf
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn(t)
            sync()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_GBps"] = t.numel() * 4 / best / 1e9
    out["GBps"] = max(v for k, v in out.items() if k.endswith("_GBps"))
    return out


def _build_info() -> dict:
    try:
        from quantkern import _ext

        return _ext.build_info()
    except Exception:  # extension missing: the benchmark records that instead of failing here
        return {}


def kernel(op: str, **ctx) -> str:
    """Name of the quantkern kernel that runs `op` for this call: the ONE place benchmarks learn it.

    quantkern has no query for it yet, so this mirrors the choice the C++ makes from build_info() (which
    reads the same env switches); switch it to quantkern.explain once that exists.
      kernel("qgemm", bits=4, batch=1, in_features=4096[, backend="cpu"])
      kernel("gptq_block_solve") / kernel("ksnrq_solve")"""
    info = _build_info()
    if not info:
        return "unavailable (extension not built)"
    if op == "qgemm":
        return _qgemm_kernel(info, **ctx)
    return f"cpu:{op} ({'avx512' if info.get('avx512_kernels') else 'avx2'})"


def decode_kernels(model, bits: int, batch: int = 1) -> dict:
    """kernel("qgemm") per input width of a model's linears: what a decode step of `batch` tokens runs
    once those linears are packed at `bits`."""
    widths = sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)})
    return {str(n): kernel("qgemm", bits=bits, batch=batch, in_features=n) for n in widths}


def _qgemm_kernel(info: dict, bits: int, batch: int, in_features: int, backend: str = "cpu") -> str:
    """Path 0 of csrc/cpu/qgemm.cpp (qgemm_cpu_out)."""
    if backend != "cpu":
        return backend
    avx512 = bool(info.get("avx512_kernels"))
    isa = "avx512" if avx512 else "avx2"
    int8_act = os.environ.get("QUANTKERN_CPU_INT8_ACT", "0") not in ("", "0")
    vnni = avx512 and "avx512vnni" in info.get("cpu_isa", [])
    kpad = -(-in_features // 32) * 32  # qg::kBlock input channels per k-block
    if batch <= 8:  # qg::kMaxGemvBatch: the GEMV family
        if int8_act:  # CpuBackend passes path 4 for every width: int8 GEMV at 4 bits with VNNI, else FMA
            return "cpu:gemv_int8x_vnni_avx512 (int8 x, opt-in)" if bits == 4 and vnni else f"cpu:gemv_fma_{isa}"
        if bits == 4 and vnni and batch <= 4:  # qg::kMaxLimbBatch
            return "cpu:gemv_vnni_digits_avx512"
        if bits in (2, 3) and info.get("amx_kernels") and (batch > 1 or kpad <= 8192):  # qg::kAmxMaxK1
            return "cpu:gemv_amx"
        if bits in (2, 3) and avx512 and batch <= 2:  # qg::kMaxLutBatch
            return "cpu:gemv_lut_avx512"
        return f"cpu:gemv_fma_{isa}"
    return f"cpu:dequant_panels_{isa}+at::mm"


def quantkern_env() -> dict:
    """The QUANTKERN_* switches set for this run (they change which kernels run)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("QUANTKERN_")}


def slug(info: dict) -> str:
    """A folder name for this machine's results: CPU model, thread count and any QUANTKERN_* switch
    ("amd-epyc-2t", "xeon-platinum-8480-2t-no-amx"), so runs with a kernel switched off land apart."""
    s = re.sub(r"\((r|tm)\)|cpu @.*|processor|\d+-core", "", info["cpu"].lower())
    s = f"{s or 'cpu'}-{info['torch_threads']}t"
    for k, v in info.get("quantkern_env", {}).items():
        s += f"-{k[len('QUANTKERN_'):]}" + ("" if v == "1" else f"-{v}")
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def machine_info(contended: bool = True, bandwidth: bool = True) -> dict:
    """Everything a result needs to say about where it ran. `contended`: whether other work may have
    shared the CPU (the default: say so unless the run held the machine to itself)."""
    import quantkern

    info = {
        "cpu": cpu_model(),
        "isa_flags": isa_flags(),
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "llc_bytes": llc_bytes(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "quantkern": getattr(quantkern, "__version__", "?"),
        "quantkern_build": _build_info(),
        "quantkern_env": quantkern_env(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": list(os.getloadavg()),
        "contended": contended,
        "note": ("measured while other work may have shared the CPU: compare ratios taken side by side, not "
                 "absolute times" if contended else "quiet machine: the run held the CPU to itself"),
    }
    if bandwidth:
        info["read_bandwidth"] = read_bandwidth_gbs()
    return info
