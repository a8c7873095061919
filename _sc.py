import torch, json
from quantkern.models.zoo import load_fp
from quantkern import grid
from quantkern.spec import QuantSpec
from quantkern.export import kquants
model, _ = load_fp("default")
tot = {}
for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.Linear) and ".layers." in name:
        W = mod.weight.detach().float()
        den = (W**2).sum()
        c, s, z, g = grid.rtn(W, QuantSpec(bits=4, group_size=32, sym=True))
        e_old = ((grid.dequantize_groups(c, s, z, g) - W)**2).sum() / den
        c, s, z, g = grid.rtn(W, QuantSpec(bits=4, group_size=32, sym=False))
        e_asym = ((grid.dequantize_groups(c, s, z, g) - W)**2).sum() / den
        out = {"gptq_sym_minmax": e_old, "gptq_asym_minmax": e_asym,
               "Q4_0_scale_first": ((kquants.choose("Q4_0", W).values() - W)**2).sum() / den,
               "Q4_1_scale_first": ((kquants.choose("Q4_1", W).values() - W)**2).sum() / den}
        if W.shape[1] % 256 == 0:
            for k in ("Q4_K", "Q3_K", "Q2_K"):
                out[k + "_scale_first(K rows)"] = ((kquants.choose(k, W).values() - W)**2).sum() / den
        for k, v in out.items():
            tot.setdefault(k, []).append(float(v))
print(json.dumps({k: round(sum(v) / len(v), 6) for k, v in tot.items()}, indent=1))
