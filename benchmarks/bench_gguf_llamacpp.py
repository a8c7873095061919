"""Side by side in llama.cpp: quantkern's GGUF files against llama.cpp's own quantizations of SmolLM2-135M.

    make llamacpp                                          # llama.cpp tools in build/llamacpp (own dir, not a dependency)
    python benchmarks/bench_gguf_llamacpp.py quantkern Q3_K Q2_K Q4_0   # quantize onto the grid + export
    python benchmarks/bench_gguf_llamacpp.py llamacpp      # fp32 export, llama-imatrix, llama-quantize (+/- imatrix)
    python benchmarks/bench_gguf_llamacpp.py ppl           # llama-perplexity of every file on the held-out text
    python benchmarks/bench_gguf_llamacpp.py bench         # llama-bench decode / prompt tokens/s (optional)
    python benchmarks/bench_gguf_llamacpp.py table         # -> benchmarks/results/gguf_kquants_smollm2.json + markdown

Protocol (same as gguf_llamacpp_smollm2.json): llama-perplexity -c 512 -b 512 --chunks 16 -t 2 on held-out
Hamlet + Macbeth (quantkern's 'eval' split). quantkern files: `quantize_gguf` (GPTQ against the type's fixed
scales, 32 x 512 Shakespeare calibration tokens, seed 0, default 8-bit head -> Q8_0), embedding f32. llama.cpp
files: llama-quantize of the fp32 export with the same embedding (f32) and head (q8_0) types, `--pure` (every
linear the named type, llama.cpp's own fallback where rows are not a multiple of 256) and its default mixes
(Q3_K_M, Q2_K); imatrix from llama-imatrix on the calibration split (the same text quantkern calibrates on).
Environment: LLAMACPP_BIN (default build/llamacpp/bin), WORK (default build/gguf_bench).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

BIN = Path(os.environ.get("LLAMACPP_BIN", ROOT / "build/llamacpp/bin"))
WORK = Path(os.environ.get("WORK", ROOT / "build/gguf_bench"))
RESULT = HERE / "results" / "gguf_kquants_smollm2.json"
PPL_ARGS = ["-c", "512", "-b", "512", "--chunks", "16", "-t", "2"]
IMATRIX_CHUNKS = 8  # 8 x 512 tokens from the start of the calibration split (CPU time on a shared 2-core machine)
LLAMA_TYPES = {  # file stem: (llama-quantize type, --pure)
    "Q4_0": ("Q4_0", True), "Q4_1": ("Q4_1", True), "Q3_K": ("Q3_K_S", True), "Q2_K": ("Q2_K", True),
    "Q3_K_M-mix": ("Q3_K_M", False), "Q2_K-mix": ("Q2_K", False),
}


def texts(split: str, max_chars: int | None = None) -> Path:
    """The built-in Shakespeare split as one text file (the first max_chars: llama-imatrix tokenizes all of it)."""
    from quantkern.calibration.data import load_texts

    f = WORK / f"{split}{'' if max_chars is None else f'-{max_chars}'}.txt"
    if not f.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        f.write_text("\n\n".join(load_texts("shakespeare", split))[:max_chars])
    return f


def run(cmd, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def cmd_quantkern(kinds, nsamples=32, seqlen=512):
    from quantkern.export.gguf import export_gguf
    from quantkern.export.gguf_solve import quantize_gguf, save_gguf_checkpoint
    from quantkern.models.zoo import load_fp

    for kind in kinds:
        model, tok = load_fp("default")
        t0 = time.perf_counter()
        model, report, blocks = quantize_gguf(model, tok, kind, calib="shakespeare", nsamples=nsamples, seqlen=seqlen,
                                              seed=0, progress=False)
        dt = time.perf_counter() - t0
        ck = save_gguf_checkpoint(model, WORK / f"qk-{kind}", blocks, tokenizer=tok)
        r = export_gguf(ck, WORK / f"qk-{kind}.gguf", model=None)
        r["quantize_s"] = round(dt, 1)
        (WORK / f"qk-{kind}.json").write_text(json.dumps(r, indent=1))
        print(kind, r, flush=True)


def cmd_llamacpp(with_imatrix=True):
    from quantkern.export.gguf import export_gguf
    from quantkern.models.zoo import load_fp

    f32 = WORK / "f32.gguf"
    if not f32.exists():
        import tempfile

        model, tok = load_fp("default")
        with tempfile.TemporaryDirectory() as d:  # the float model's tokenizer files, for the vocab
            tok.save_pretrained(d)
            model.config.save_pretrained(d)
            export_gguf(d, f32, model=model)
    imat = WORK / "imatrix.gguf"
    if with_imatrix and not imat.exists():
        # on a Q8_0 copy (int8 dot products: several times faster than f32 on this CPU; activations ~unchanged)
        q8 = WORK / "q8_0-for-imatrix.bin"
        if not q8.exists():
            run([BIN / "llama-quantize", f32, q8, "Q8_0", "2"], WORK / "q8_0.quantize.log")
        run([BIN / "llama-imatrix", "-m", q8, "-f", texts("calib", 100_000), "-o", imat, "-c", "512", "--chunks",
             str(IMATRIX_CHUNKS), "-t", "2"], WORK / "imatrix.log")
    for stem, (qtype, pure) in LLAMA_TYPES.items():
        for im in ([False, True] if with_imatrix else [False]):
            out = WORK / f"ll-{stem}{'-imat' if im else ''}.gguf"
            if out.exists():
                continue
            cmd = [BIN / "llama-quantize", "--token-embedding-type", "f32", "--output-tensor-type", "q8_0"]
            cmd += (["--pure"] if pure else []) + (["--imatrix", imat] if im else []) + [f32, out, qtype, "2"]
            run(cmd, out.with_suffix(".quantize.log"))
            print(out.name, flush=True)


def ppl_of(log: Path):
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log.read_text())
    return (float(m.group(1)), float(m.group(2))) if m else None


def cmd_ppl(only=None):
    ev = texts("eval")
    for g in sorted(WORK.glob("*.gguf")):
        if g.name == "imatrix.gguf" or (only and not any(o in g.name for o in only)):
            continue
        log = g.with_suffix(".ppl.log")
        if log.exists() and ppl_of(log):
            continue
        run([BIN / "llama-perplexity", "-m", g, "-f", ev, *PPL_ARGS], log)
        print(g.name, ppl_of(log), flush=True)


def cmd_bench(only=None):
    for g in sorted(WORK.glob("*.gguf")):
        if g.name == "imatrix.gguf" or (only and not any(o in g.name for o in only)):
            continue
        log = g.with_suffix(".bench.jsonl")
        if not log.exists():
            run([BIN / "llama-bench", "-m", g, "-t", "2", "-p", "128", "-n", "128", "-r", "2", "-o", "jsonl"], log)


def tensor_types(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(path)
    out: dict[str, int] = {}
    for t in r.tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return out


def bpw_linears(path: Path) -> float:
    """Bits per weight of the block linears (blk.*, 2-D), the part the two sides quantize differently."""
    import gguf

    r = gguf.GGUFReader(path)
    nbytes = nw = 0
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2 and t.shape[1] > 1:
            nbytes += int(t.n_bytes)
            nw += int(t.n_elements)
    return 8 * nbytes / nw


def cmd_table(types=False):
    rows = []
    for g in sorted(WORK.glob("*.gguf")):
        if g.name == "imatrix.gguf":
            continue
        p = ppl_of(g.with_suffix(".ppl.log")) if g.with_suffix(".ppl.log").exists() else None
        row = {"file": g.name, "bytes": g.stat().st_size, "ppl": p and p[0], "ppl_stderr": p and p[1]}
        ql = g.with_suffix(".quantize.log")
        if ql.exists():  # llama-quantize's own fallbacks (rows not a multiple of 256) and size line
            txt = ql.read_text()
            fb = re.findall(r"falling back to\s+(\w+)", txt)
            row["llama_fallbacks"] = {t: fb.count(t) for t in sorted(set(fb))}
            m = re.search(r"quant size\s+=\s+([0-9.]+) MiB \(([0-9.]+) BPW\)", txt)
            if m:
                row["llama_quant_size_mib"], row["llama_bpw"] = float(m.group(1)), float(m.group(2))
        if types:  # slow on a busy machine: reads every tensor header of every file
            row.update(linear_bpw=round(bpw_linears(g), 3), tensor_types=tensor_types(g))
        b = g.with_suffix(".bench.jsonl")
        if b.exists():
            for line in b.read_text().splitlines():
                j = json.loads(line)
                row["decode_tok_s" if j.get("n_gen") else "prompt_tok_s"] = round(j["avg_ts"], 1)
        rows.append(row)
    out = {"what": "SmolLM2-135M-Instruct: quantkern GGUF-grid files vs llama.cpp's own quantizations, perplexity by "
                   "llama-perplexity", "protocol": f"llama-perplexity {' '.join(PPL_ARGS)} on held-out Hamlet + Macbeth",
           "llama.cpp": "vendored by llama-cpp-python 0.3.36 (ggml-org/llama.cpp@0c1e57098)",
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    RESULT.write_text(json.dumps(out, indent=1))
    print("| file | MiB | ppl (llama.cpp) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['bytes'] / 2**20:.1f} | {r['ppl']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantkern")
    q.add_argument("kinds", nargs="+", choices=("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"))
    q.add_argument("--nsamples", type=int, default=32)
    sub.add_parser("llamacpp").add_argument("--no-imatrix", action="store_true")
    sub.add_parser("ppl").add_argument("only", nargs="*")
    sub.add_parser("bench").add_argument("only", nargs="*")
    sub.add_parser("table").add_argument("--types", action="store_true", help="also tensor types and linear bpw")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if a.cmd == "quantkern":
        cmd_quantkern(a.kinds, a.nsamples)
    elif a.cmd == "llamacpp":
        cmd_llamacpp(not a.no_imatrix)
    elif a.cmd == "ppl":
        cmd_ppl(a.only)
    elif a.cmd == "bench":
        cmd_bench(a.only)
    else:
        cmd_table(a.types)


if __name__ == "__main__":
    main()
