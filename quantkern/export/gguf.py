"""Export a quantkern checkpoint to one GGUF file that llama.cpp, Ollama and LM Studio run as is.

Quantized linears are written bit for bit as the llama.cpp block type that is exactly their grid
(Q4_0 / Q8_0, or Q4_1 up to its fp16 offset; quantkern.export.ggml_blocks); a grid with no exact twin is
refused before anything is written. Everything else (norms, embedding, a float head, tokenizer, metadata)
goes out as llama.cpp's converter writes it, through the `gguf` package's GGUFWriter.

Integer codes, scales, zero points and g_idx are read from the loaded QuantLinear modules (through
formats.gptq.unpack), never from the files, so checkpoint-format details stay in the loader.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .. import __version__
from ..formats import gptq
from ..nn import QuantLinear
from . import ggml_blocks, gguf_llama, kquants
from .gguf_sidecar import SIDECAR, load_sidecar
from .gguf_vocab import BpeVocab

FLOAT_TYPES = ("auto", "f32", "f16", "q8_0")
_FILE_TYPE = {T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.F32: gguf.LlamaFileType.ALL_F32, T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
              T.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, T.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K}
_K_TYPES = (T.Q4_K, T.Q3_K, T.Q2_K)


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; nothing was written."""


@dataclass
class Plan:
    """Every tensor and key of the file, built and checked in memory before the file is opened."""

    tensors: list = field(default_factory=list)  # (gguf name, array, raw ggml type or None, exact: bool)

    def add(self, name, array, qtype=None, exact=True):
        self.tensors.append((name, np.ascontiguousarray(array), qtype, exact))

    def types(self) -> Counter:
        return Counter((q or (T.F16 if a.dtype == np.float16 else T.F32)).name for _, a, q, _ in self.tensors)


def module_grid(mod: QuantLinear):
    """(codes [m, n], scales fp16 [G, m], zeros [G, m], g_idx [n]) of a loaded QuantLinear."""
    return gptq.unpack({k: getattr(mod, k) for k in gptq.TENSOR_NAMES}, mod.spec.bits)


def exact_blocks(mod: QuantLinear, rows: torch.Tensor | None):
    """(block bytes, ggml type) of a QuantLinear, its rows reordered by `rows`; ggml_blocks.NotExact
    (naming the setting that exports) when its grid has no exact twin."""
    codes, scales, zeros, g_idx = (t.detach().cpu() for t in module_grid(mod))
    d, zero = ggml_blocks.block_params(scales, zeros, g_idx)
    qtype = ggml_blocks.exact_type(mod.spec.bits, zero)
    if rows is not None:
        codes, d, zero = codes[rows], d[rows], zero[rows]
    return ggml_blocks.encode(codes, d, zero, qtype), qtype


def _refusal(errors: dict) -> ExportError:
    """One message for every module without an exact twin, grouped by reason, so one re-run fixes them all."""
    lines = []
    for (what, why, fix), names in errors.items():
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        lines.append(f"  {names[0]}{more} ({what}): {why}; {fix}")
    n = sum(len(v) for v in errors.values())
    return ExportError(f"no exact GGUF twin for {n} linear{'s' if n > 1 else ''}, nothing written:\n" + "\n".join(lines))


def float_tensor(t: torch.Tensor, kind: str) -> tuple[np.ndarray, T | None, bool]:
    """(array, raw type, exact) of a float tensor as asked: auto = its own precision (f16 stays f16,
    anything else f32), or f32 / f16 / q8_0 (llama.cpp's own Q8_0 rounding, through gguf.quants)."""
    t = t.detach().cpu()
    if kind == "auto":
        kind = "f16" if t.dtype == torch.float16 else "f32"
    a = t.float().numpy()
    if kind == "f32":
        return a, None, True
    if kind == "f16":
        return a.astype(np.float16), None, t.dtype == torch.float16
    if a.shape[-1] % ggml_blocks.QK:
        raise ExportError(f"q8_0 needs rows that are a multiple of {ggml_blocks.QK}, got {a.shape[-1]}")
    return gguf.quants.quantize(a, T.Q8_0), T.Q8_0, False


def _float_into(plan: Plan, gname: str, t: torch.Tensor, kind: str) -> None:
    plan.add(gname, *float_tensor(t, kind))


def kquant_blocks(name: str, weight: torch.Tensor, kind: str, blocks: np.ndarray, rows) -> tuple[np.ndarray, T]:
    """The stored K-quant block bytes of a float linear (gguf_solve's sidecar), rows reordered by `rows`,
    after checking that they decode bit for bit to the checkpoint's weight (a stale or foreign sidecar fails)."""
    qtype = kquants.LAYOUTS[kind].qtype
    w = weight.detach().float().cpu().numpy()
    try:
        deq = gguf.quants.dequantize(blocks, qtype).reshape(w.shape)
    except ValueError as e:
        raise ExportError(f"{name}: {SIDECAR} holds {kind} blocks of the wrong shape ({e})") from e
    if not np.array_equal(deq.view(np.uint32), w.view(np.uint32)):
        raise ExportError(f"{name}: its {kind} blocks in {SIDECAR} do not decode to the checkpoint's "
                          "weight; re-run quantize --gguf-type")
    return (blocks if rows is None else blocks[rows.cpu().numpy()]), qtype


def build_plan(model, embed_type: str = "auto", head_type: str = "auto", kblocks: dict | None = None) -> Plan:
    """All tensors of `model` (from quantkern.load) as the GGUF will hold them; raises before any I/O.
    kblocks: {module name: (K-quant kind, block bytes)} of float linears (the checkpoint's K-quant sidecar)."""
    kblocks = kblocks or {}
    for what, v in (("embed_type", embed_type), ("head_type", head_type)):
        if v not in FLOAT_TYPES:
            raise ExportError(f"{what} must be one of {FLOAT_TYPES}, got {v!r}")
    cfg = model.config
    try:
        gguf_llama.check_config(cfg)
    except gguf_llama.ArchError as e:
        raise ExportError(str(e)) from e
    nblk = cfg.num_hidden_layers
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    plan = Plan()
    errors: dict[tuple, list[str]] = {}
    tied = isinstance(head, torch.nn.Linear) and head.weight is embed.weight
    for key, t in model.state_dict(keep_vars=True).items():  # model order: embedding, blocks, norm, head
        mod_name, _, leaf = key.rpartition(".")
        packed = mod_name in qmods and leaf != "bias"
        if packed and leaf != "qweight":
            continue  # qzeros / scales / g_idx travel with qweight
        rows = gguf_llama.row_order(mod_name, cfg)
        try:
            gname = gguf_llama.tensor_name(mod_name + ".weight" if packed else key, nblk)
        except gguf_llama.ArchError as e:
            raise ExportError(str(e)) from e
        if packed:
            mod = qmods[mod_name]
            if mod is head and head_type != "auto":  # dequantized, then stored as asked
                _float_into(plan, gname, mod.dequantized_weight(), head_type)
                continue
            try:
                blocks, qtype = exact_blocks(mod, rows)
                plan.add(gname, blocks, qtype, exact=qtype != T.Q4_1)  # Q4_1: within q4_1_bound, not bit for bit
            except ggml_blocks.NotExact as e:
                s = mod.spec
                fix = e.fix + (" (for the head: --lm-head auto or 8 when quantizing, or --head-type f32 here: its dequantized weight, exact)" if mod is head else "")
                errors.setdefault((f"{s.bits}-bit, group {s.group_size}, {'sym' if s.sym else 'asym'}", e.reason, fix),
                                  []).append(mod_name)
            continue
        if mod_name == head_name and tied and head_type == "auto":
            continue  # tied head: llama.cpp reads token_embd, as the converter leaves output.weight out
        if leaf == "weight" and mod_name in kblocks:  # a K-quant linear: its stored blocks, exactly
            plan.add(gname, *kquant_blocks(mod_name, t, kblocks[mod_name][0], kblocks[mod_name][1], rows))
            continue
        t = t.detach()
        if rows is not None:
            t = t[rows]
        if t.dim() == 1:
            plan.add(gname, t.float().cpu().numpy())  # norms and biases: f32, as the converter writes 1-D tensors
        else:  # embedding, float head, or a linear left in float (e.g. a partial quantization)
            _float_into(plan, gname, t, head_type if mod_name == head_name else
                        embed_type if gname == "token_embd.weight" else "auto")
    if errors:
        raise _refusal(errors)
    for gname, t in gguf_llama.extra_tensors(cfg).items():
        plan.add(gname, t.numpy())
    return plan


def _file_type(plan: Plan) -> int:
    kq = Counter(q for _, _, q, _ in plan.tensors if q in _K_TYPES)
    if kq:
        return int(_FILE_TYPE[kq.most_common(1)[0][0]])
    quant = Counter(q for _, _, q, _ in plan.tensors if q in ggml_blocks.EXACT_TYPES)
    if quant:
        return int(_FILE_TYPE[quant.most_common(1)[0][0]])
    has_f16 = any(a.dtype == np.float16 for _, a, _, _ in plan.tensors)
    return int(_FILE_TYPE[T.F16 if has_f16 else T.F32])


def _write_atomic(writer: gguf.GGUFWriter, out: Path) -> None:
    """Write into a temporary sibling and rename it over `out`: a reader (or a crash) never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.flush()
        for f in writer.fout or []:
            os.fsync(f.fileno())
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the export is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def export_gguf(checkpoint, out_path, *, embed_type: str = "auto", head_type: str = "auto",
                tokenizer_pre: str | None = None, model=None) -> dict:
    """Write the quantkern checkpoint directory `checkpoint` as the GGUF file `out_path` (atomically).

    embed_type / head_type: "auto" (a float table in its own precision; a quantized head exactly), or
    "f32" / "f16" / "q8_0" (a quantized head is dequantized first: f32 keeps it exact). tokenizer_pre:
    llama.cpp's pre-tokenizer name when the tokenizer is not one it recognises. `model`: the already
    loaded checkpoint (quantkern.load(checkpoint, fuse=False)), to skip loading it again.
    Returns a summary: path, tensor types, file type, the tensors that are not bit for bit quantkern's
    (Q4_1 linears, within ggml_blocks.q4_1_bound; floats stored at a lower precision), pre-tokenizer.
    """
    from ..models.checkpoint import load

    checkpoint, out = Path(checkpoint), Path(out_path)
    if model is None:
        model = load(checkpoint, fuse=False)
    plan = build_plan(model, embed_type, head_type, load_sidecar(checkpoint))
    cfg = model.config
    try:
        vocab = BpeVocab(checkpoint, cfg.vocab_size, tokenizer_pre)
    except ValueError as e:
        raise ExportError(str(e)) from e
    writer = gguf.GGUFWriter(None, gguf_llama.ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(checkpoint.resolve().name)
    writer.add_quantized_by(f"quantkern {__version__}")
    gguf_llama.add_hparams(writer, cfg)
    writer.add_file_type(_file_type(plan))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
    for name, array, qtype, _ in plan.tensors:
        writer.add_tensor(name, array, raw_dtype=qtype)
    _write_atomic(writer, out)
    return {"path": str(out), "tensors": dict(plan.types()), "file_type": gguf.LlamaFileType(_file_type(plan)).name,
            "not_bit_exact": [n for n, _, _, exact in plan.tensors if not exact], "tokenizer_pre": vocab.pre}
