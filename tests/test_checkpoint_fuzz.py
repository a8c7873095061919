"""Bad checkpoints: hypothesis mutates a valid checkpoint's configs, tensors and files, and quantkern.load
either refuses with CheckpointError or loads a model whose logits equal the original's, never a crash or
silent garbage. Loaded with check=False so the manifest does not catch the edit first: the deeper checks
(config against tensors, shapes, dtypes, zero points) are what is under test."""
import json
import re
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from driver_tiny import tiny_llama, tiny_tokens

import quantkern
from quantkern.models import checkpoint as ckpt
from quantkern.spec import QuantSpec

IDS = tiny_tokens(1, 12, seed=9)
MODULE = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    model, _ = quantkern.quantize_model(tiny_llama(), None, QuantSpec(bits=4, group_size=32, act_order=True),
                                        method="gptq", calib=tiny_tokens(), progress=False)
    path = quantkern.save_quantized(model, tmp_path_factory.mktemp("valid") / "ck")
    with torch.no_grad():
        return path, quantkern.load(path)(input_ids=IDS).logits


CONFIG_EDITS = st.one_of(
    st.tuples(st.just("bits"), st.sampled_from([2, 3, 5, 8, 16, "4", None, True])),
    st.tuples(st.just("group_size"), st.sampled_from([-1, 0, 16, 64, 128, "32", None, 32.5])),
    st.tuples(st.just("sym"), st.booleans()),
    st.tuples(st.just("desc_act"), st.booleans()),
    st.tuples(st.just("static_groups"), st.booleans()),
    st.tuples(st.just("checkpoint_format"), st.sampled_from(["gptq", "gptq_v2", "gptq_p", "marlin", 7])),
    st.tuples(st.just("quant_method"), st.sampled_from(["gptq", "awq", None])),
    st.tuples(st.just("pack_dtype"), st.sampled_from(["int32", "int16", "int64"])),
    st.tuples(st.just("dynamic"), st.sampled_from([{}, {r"+:.*v_proj": {"bits": 8}}, {r"-:.*v_proj": {}},
                                                   {r"+:.*v_proj": {"group_size": 64}}, {"+:[": {"bits": 4}}])),
    st.tuples(st.just("lm_head"), st.booleans()),
)
TENSOR_EDITS = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(["qweight", "qzeros", "scales", "g_idx"])),
    st.tuples(st.just("dtype"), st.sampled_from(["qweight", "qzeros", "g_idx", "scales"]),
              st.sampled_from([torch.int64, torch.float32, torch.int16])),
    st.tuples(st.just("rows"), st.sampled_from(["qweight", "qzeros", "scales", "g_idx"]), st.sampled_from([-1, 1])),
    st.tuples(st.just("g_idx_out_of_range"), st.just("g_idx")),
    st.tuples(st.just("float_shape"), st.sampled_from(["model.norm.weight", "model.embed_tokens.weight"])),
)
FILE_EDITS = st.tuples(st.just("truncate"), st.floats(0.0, 0.999))


def _edit_config(path, key, value):
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((path / name).read_text())
        qc = cfg if name == "quantize_config.json" else cfg["quantization_config"]
        if value is None:
            qc.pop(key, None)
        else:
            qc[key] = value
        (path / name).write_text(json.dumps(cfg))


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    kind, what = edit[0], edit[1]
    key = what if kind == "float_shape" else f"{MODULE}.{what}"
    if kind == "drop":
        del sd[key]
    elif kind == "dtype":
        sd[key] = sd[key].to(edit[2])
    elif kind == "rows":
        t = sd[key]
        sd[key] = t[:-1].clone() if edit[2] < 0 else torch.cat([t, t[:1]])
    elif kind == "g_idx_out_of_range":
        sd[key] = sd[key].clone()
        sd[key][3] = 1000
    elif kind == "float_shape":
        sd[key] = sd[key][:-1].clone()
    save_file(sd, str(path / "model.safetensors"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.one_of(CONFIG_EDITS, TENSOR_EDITS, FILE_EDITS), min_size=1, max_size=2))
def test_mutated_checkpoint_refused_or_exact(valid, tmp_path_factory, edits):
    src, want = valid
    path = tmp_path_factory.mktemp("mut") / "ck"
    shutil.copytree(src, path)
    for edit in edits:
        if edit[0] == "truncate":
            f = path / "model.safetensors"
            f.write_bytes(f.read_bytes()[: int(f.stat().st_size * edit[1])])
        elif edit[0] in ("drop", "dtype", "rows", "g_idx_out_of_range", "float_shape"):
            if (path / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size // 2:
                continue  # already truncated: nothing to edit
            try:
                _edit_tensors(path, edit)
            except Exception:  # a truncated file cannot be edited: the truncation is the test
                continue
        else:
            _edit_config(path, *edit)
    try:
        model = quantkern.load(path, check=False)
    except ckpt.CheckpointError:
        return  # refused, by name
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{edits} loaded wrong: {m}")


@pytest.mark.parametrize("edit,refusal", [
    (("desc_act", False), None),  # informational: g_idx decides
    (("sym", False), None),  # the stored zeros are read either way
    (("static_groups", True), None),
    (("bits", 8), "packed tensors do not match its quantize_config (8-bit, group 32)"),
    (("group_size", 64), "scales hold 3 groups, but group_size 64 over 96 inputs means 2"),
    (("checkpoint_format", "gptq_v2"), "says sym=true but a zero point is 7"),
    (("dynamic", {r"-:.*v_proj": {}}), "dynamic rules exclude it"),
    (("quant_method", "awq"), "quant_method='awq'"),
    (("drop", "g_idx"), "lacks ['g_idx']"),
    (("dtype", "qweight", torch.int64), "qweight must be torch.int32"),
    (("rows", "scales", -1), "qzeros shape"),
    (("g_idx_out_of_range", "g_idx"), "g_idx values must lie in"),
    (("float_shape", "model.norm.weight"), "size mismatch for model.norm.weight"),
    (("truncate", 0.5), "cannot read weights"),
])
def test_specific_edits(valid, tmp_path, edit, refusal):
    src, want = valid
    path = tmp_path / "ck"
    shutil.copytree(src, path)
    if edit[0] == "truncate":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif edit[0] in ("drop", "dtype", "rows", "g_idx_out_of_range", "float_shape"):
        _edit_tensors(path, edit)
    else:
        _edit_config(path, *edit)
    if refusal is None:
        with torch.no_grad():
            torch.testing.assert_close(quantkern.load(path, check=False)(input_ids=IDS).logits, want, rtol=0, atol=0)
    else:
        with pytest.raises(ckpt.CheckpointError, match=re.escape(refusal)):
            quantkern.load(path, check=False)
