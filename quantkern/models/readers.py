"""Which engines load a GPTQ checkpoint correctly, judged from its quantize_config.

Only as optimistic as what was run: tests/interop (make test-interop) loads quantkern's checkpoints in
transformers 5.25 (optimum 2.3) and GPTQModel 7.6 on CPU and compares logits, and its last test checks this
table against those measurements. Engines that cannot run here (vLLM, GPU kernels) say "untested".
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    ok: bool | None  # True: loads with correct logits; False: refuses or misloads; None: untested here
    why: str

    def __str__(self) -> str:
        word = {True: "yes", False: "NO", None: "untested"}[self.ok]
        return f"{word} ({self.why})" if self.why else word


def _body_grids_differ(qcfg: dict) -> bool:
    """A `dynamic` rule that gives some module other than the head its own grid."""
    return any("lm_head" not in pattern for pattern in (qcfg.get("dynamic") or {}))


def reader_support(qcfg: dict) -> dict[str, Verdict]:
    bits, fmt = qcfg.get("bits"), qcfg.get("checkpoint_format", "gptq")
    sym = qcfg.get("sym", True)
    by_gptqmodel = str(qcfg.get("meta", {}).get("quantizer", "")).lower().startswith("gptqmodel")
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
    else:
        out["transformers"] = Verdict(True, "through optimum + GPTQModel's kernels")

    out["vLLM"] = Verdict(None, "needs a GPU; not run here")
    return out
