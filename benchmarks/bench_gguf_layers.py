"""Per-tensor side by side on SmolLM2-135M's K-quant tensors (ffn_down, 1536 inputs): quantkern's scale-first GPTQ
codes vs llama.cpp's own file of the same type, on the output error each causes on HELD-OUT activations.

    WORK=... python benchmarks/bench_gguf_layers.py --layers 0 7 14 21 29

A cheap stand-in for the full-model perplexity when quantizing all 30 blocks is too slow. For each chosen block:
H_cal / H_eval = X^T X / N of the fp32 model's down_proj input on calibration (quantkern's 'calib' split) /
held-out ('eval' split) text; quantkern's Q3_K / Q2_K of that tensor = kquants.choose weighted by diag(H_cal),
codes by gguf_solve.solve_fixed(H_cal) (no error propagation between layers: every block sees fp inputs);
llama.cpp's = the tensor read from its `llama-quantize --pure` files (with and without imatrix) and decoded
with gguf.quants.dequantize. Reported: relative output error tr(E H_eval E^T) / tr(W H_eval W^T), E = W - W_q.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
WORK = Path(os.environ.get("WORK", HERE.parent / "build/gguf_bench"))


def down_inputs_H(model, tok, split, layers, nsamples, seqlen, seed=0):
    from quantkern.calibration.data import calibration_samples, evaluation_tokens

    if split == "calib":
        ids = calibration_samples(tok, "shakespeare", nsamples, seqlen, seed)
    else:
        toks = torch.cat([t.flatten() for t in evaluation_tokens(tok, "shakespeare", max_tokens=nsamples * seqlen)])
        ids = toks[: nsamples * seqlen].reshape(nsamples, seqlen)
    H = {li: torch.zeros(1536, 1536, dtype=torch.float64) for li in layers}
    n = {"tok": 0}

    def hook(li):
        def f(mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            H[li] += x.t() @ x
        return f

    hs = [model.model.layers[li].mlp.down_proj.register_forward_pre_hook(hook(li)) for li in layers]
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i:i + 1])
    for h in hs:
        h.remove()
    N = ids.numel()
    return {li: (H[li] / N).float() for li in layers}


def llama_tensor(path: Path, name: str) -> tuple[torch.Tensor, str]:
    import gguf

    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()), t.tensor_type.name


def main():
    from quantkern.export import gguf_solve, kquants
    from quantkern.models.zoo import load_fp

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 7, 14, 21, 29])
    ap.add_argument("--nsamples", type=int, default=16, help="calibration sequences")
    ap.add_argument("--eval-samples", type=int, default=4, help="held-out sequences")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--no-shrink", action="store_true", help="raw H_cal (the driver shrinks it by its token count)")
    a = ap.parse_args()
    from quantkern.calibration.shrinkage import shrink_to_diagonal

    model, tok = load_fp("default")
    t0 = time.perf_counter()
    Hc = down_inputs_H(model, tok, "calib", a.layers, a.nsamples, a.seqlen)
    if not a.no_shrink:  # as the driver does (Method.hessian): towards the diagonal by how many tokens estimated H
        Hc = {li: shrink_to_diagonal(H, a.nsamples * a.seqlen)[0] for li, H in Hc.items()}
    He = down_inputs_H(model, tok, "eval", a.layers, a.eval_samples, a.seqlen)
    rows = []
    for li in a.layers:
        W = model.model.layers[li].mlp.down_proj.weight.detach().float()
        H = He[li].double()
        base = float(((W.double() @ H) * W.double()).sum())

        def rel(Wq):
            E = (W - Wq).double()
            return float(((E @ H) * E).sum()) / base

        for kind in ("Q3_K", "Q2_K"):
            g0 = kquants.choose(kind, W, torch.diagonal(Hc[li]))
            g = gguf_solve.solve_fixed(W, Hc[li], g0, damp=0.01, act_order=True)
            row = {"layer": li, "type": kind, "quantkern_rtn_on_chosen_scales": rel(g0.values()),
                   "quantkern_gptq": rel(g.values())}
            for im in ("", "-imat"):
                f = WORK / f"ll-{kind}{im}.gguf"
                if f.exists():
                    Wl, tt = llama_tensor(f, f"blk.{li}.ffn_down.weight")
                    assert tt == kind, (f, tt)
                    row[f"llama.cpp{im or '-no-imat'}"] = rel(Wl.reshape(W.shape))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"what": __doc__.strip().splitlines()[0], "calib_tokens": a.nsamples * a.seqlen,
           "eval_tokens": a.eval_samples * a.seqlen, "shrink": not a.no_shrink,
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    name = f"gguf_layers_smollm2_cal{a.nsamples * a.seqlen}{'_noshrink' if a.no_shrink else ''}.json"
    (HERE / "results" / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
