"""Which engines load a GPTQ checkpoint correctly, judged from its quantize_config.

Only as optimistic as what was run: tests/interop (make test-interop) loads quantkern's checkpoints in
transformers 5.25 (optimum 2.3) and GPTQModel 7.6 on CPU and compares logits, and its last test checks this
table against those measurements. vLLM cannot run here (no GPU): its rules are read from its source and
say so ("by its source").

vLLM, from vllm-project/vllm (read 2026-12-06): since the GPTQ consolidation (PR #38288, v0.26: gptq.py and
its exllama kernels removed, `gptq`/`gptq_marlin` both map to quantization/auto_gptq.py AutoGPTQConfig),
AutoGPTQConfig raises "Unsupported quantization config: bits=..., sym=..." for (bits, sym) outside TYPE_MAP
= {(4, True), (8, True)}, verify_marlin_supported refuses group sizes outside MARLIN_SUPPORTED_GROUP_SIZES
= [-1, 32, 64, 128] (utils/marlin_utils.py), `dynamic` overrides are applied per module and re-checked
against the same rules (utils/gptq_utils.py get_linear_quant_method), and checkpoint_format is not read
(Marlin ignores qzeros for symmetric grids). Older vLLM (gptq.py, exllama gptq_gemm) also took 2/3-bit and
asymmetric checkpoints, honouring gptq_v2; we judge by the current rules.
"""
from __future__ import annotations

from dataclasses import dataclass


VLLM_BITS_SYM = {(4, True), (8, True)}
VLLM_GROUP_SIZES = (-1, 32, 64, 128)


@dataclass(frozen=True)
class Verdict:
    ok: bool | None  # True: loads with correct logits; False: refuses or misloads; None: unknown
    why: str
    basis: str = "measured"  # "measured" (tests/interop) or "source" (read from the engine's code, not run)

    @property
    def word(self) -> str:
        """The verdict in a word or two: yes / NO / unknown, and whether it was read from source."""
        word = {True: "yes", False: "NO", None: "unknown"}[self.ok]
        return word + (" (by its source)" if self.basis == "source" else "")

    def __str__(self) -> str:
        word = {True: "yes", False: "NO", None: "unknown"}[self.ok]
        if self.basis == "source":
            word += ", by its source (not run here)"
        return f"{word} ({self.why})" if self.why else word


def _body_grids_differ(qcfg: dict) -> bool:
    """A `dynamic` rule that gives some module other than the head its own grid."""
    # "-:" rules only leave modules in float (MoE routers/gates): no other grid
    return any("lm_head" not in pattern and not pattern.startswith("-:") for pattern in (qcfg.get("dynamic") or {}))


def reader_support(qcfg: dict) -> dict[str, Verdict]:
    bits, fmt = qcfg.get("bits"), qcfg.get("checkpoint_format", "gptq")
    sym = qcfg.get("sym", True)
    quantizer = (qcfg.get("meta") or {}).get("quantizer") or []  # GPTQModel writes ["gptqmodel:7.6.0", ...]
    by_gptqmodel = any(str(q).lower().startswith("gptqmodel") for q in
                       ([quantizer] if isinstance(quantizer, str) else quantizer))
    out = {"quantkern": Verdict(True, "")}
    if bits not in (2, 3, 4, 8):
        no = Verdict(False, f"{bits}-bit GPTQ is not read")
        return {**out, "GPTQModel": no, "transformers": no, "vLLM": no}

    if fmt == "gptq" and not sym and not by_gptqmodel:
        out["GPTQModel"] = Verdict(False, "refuses asymmetric v1 checkpoints it did not write; quantkern "
                                          "writes asymmetric ones as gptq_v2")
    else:
        out["GPTQModel"] = Verdict(True, "its automatic 4-bit CPU kernel computes in bf16 and needs outputs % 16 == 0 "
                                         "and a group size; backend=TORCH (fp16) has neither limit")

    if qcfg.get("lm_head"):
        out["transformers"] = Verdict(False, "MISLOADS: ignores the packed lm_head and builds a random one; "
                                             "quantize with --lm-head auto (rounded at load) or fp")
    elif _body_grids_differ(qcfg):
        out["transformers"] = Verdict(False, "MISLOADS: applies one grid to every block linear, ignoring "
                                             "`dynamic` overrides")
    elif bits == 4 and qcfg.get("group_size") not in (32, 64, 128, 256):
        out["transformers"] = Verdict(False, "refuses on CPU: its 4-bit kernel (torch int4pack) takes groups of "
                                             "32-256 only; GPTQModel with backend=TORCH loads it")
    else:
        out["transformers"] = Verdict(True, "through optimum + GPTQModel's kernels")

    out["vLLM"] = vllm_verdict(qcfg)
    float_linears = (qcfg.get("meta") or {}).get("kept_float_linears") or []
    if float_linears and out["transformers"].ok:
        out["transformers"] = Verdict(False, f"quantizes every linear in the blocks, ignoring dynamic '-:' rules: the "
                                             f"float {float_linears[0].rpartition('.')[2]} does not load (an error)")
    if (qcfg.get("meta") or {}).get("experts"):  # one packed linear per expert projection (models/moe.py)
        if out["vLLM"].ok:
            out["vLLM"] = Verdict(None, "MoE with per-expert packed linears: neither run nor read in its source here")
    return out


def vllm_verdict(qcfg: dict) -> Verdict:
    grids = [(qcfg.get("bits"), qcfg.get("sym", True), qcfg.get("group_size"))]
    for pattern, override in (qcfg.get("dynamic") or {}).items():
        if not pattern.startswith("-:") and isinstance(override, dict):
            grids.append((override.get("bits", grids[0][0]), override.get("sym", grids[0][1]),
                          override.get("group_size", grids[0][2])))
    for bits, sym, group in grids:
        if (bits, bool(sym)) not in VLLM_BITS_SYM:
            return Verdict(False, f"refuses bits={bits}, sym={sym}: 4/8-bit symmetric only (AutoGPTQConfig "
                                  "TYPE_MAP)", "source")
        if group not in VLLM_GROUP_SIZES:
            return Verdict(False, f"refuses group_size {group}: Marlin takes -1/32/64/128", "source")
    return Verdict(True, "4/8-bit symmetric, Marlin group size", "source")
