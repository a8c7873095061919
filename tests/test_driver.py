"""Layer-by-layer driver on a tiny random Llama: groups, partial layers, statistics plumbing, plug-ins."""
import copy

import pytest
import torch

from driver_tiny import tiny_llama, tiny_tokens

import quantkern
from quantkern.models import arch, checkpoint, driver
from quantkern.spec import QuantSpec

SPEC3 = QuantSpec(bits=3, group_size=32)


def test_arch_table_and_tracing_agree():
    model = tiny_llama()
    path, blocks = arch.find_blocks(model)
    assert path == "model.layers" and len(blocks) == 2
    ids = tiny_tokens(1, 16)
    inps, kw = driver._capture_first_block(model, blocks[0], ids)
    table = arch.linear_groups(model, blocks[0], lambda: None)
    assert table == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    model.config.model_type = "unknown-arch"  # forces the generic path
    with torch.no_grad():
        traced = arch.linear_groups(model, blocks[0], lambda: blocks[0](inps[0], **kw))
    assert [set(g) for g in traced] == [set(g) for g in table]


def test_first_block_capture_matches_embeddings():
    model = tiny_llama()
    ids = tiny_tokens(3, 16)
    inps, kw = driver._capture_first_block(model, model.model.layers[0], ids)
    assert len(inps) == 3 and "position_embeddings" in kw
    torch.testing.assert_close(inps[1][0], model.model.embed_tokens(ids[1]))


def test_layers_subset_only_quantizes_those():
    model, rep = quantkern.quantize_model(tiny_llama(layers=3), None, SPEC3, method="rtn", calib=tiny_tokens(),
                                          layers=[1], progress=False)
    names = set(checkpoint.quant_modules(model))
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert rep.layers == [1] and {r["layer"] for r in rep.modules} == {1}
    assert rep.forward_s == 0 and rep.nsamples == 0  # RTN needs no calibration forwards


def _block0_output_error(method, **kw):
    # in-sample error on 256 tokens: raw statistics, no net (shrinkage trades in-sample fit for held-out error)
    kw = {"shrink": False, "safety_net": False, **kw}
    fp = tiny_llama()
    calib = tiny_tokens(8, 32)
    q, _ = quantkern.quantize_model(copy.deepcopy(fp), None, SPEC3, method=method, calib=calib, layers=1,
                                    progress=False, **kw)
    inps, kwargs = driver._capture_first_block(fp, fp.model.layers[0], calib)
    with torch.no_grad():
        err = sum(float((driver._block_out(q.model.layers[0](x, **kwargs)) -
                         driver._block_out(fp.model.layers[0](x, **kwargs))).pow(2).sum()) for x in inps)
    return err


def test_gptq_beats_rtn_on_its_calibration_data():
    # if the hooks fed the solver the wrong activations, GPTQ would not beat RTN on the very same inputs
    assert _block0_output_error("gptq") < 0.8 * _block0_output_error("rtn")


def test_snrq_runs_fp_stream_and_beats_rtn():
    assert _block0_output_error("snrq", alpha=0.25) < 0.8 * _block0_output_error("rtn")


def test_quantized_forward_is_finite_and_changed():
    fp = tiny_llama()
    ids = tiny_tokens(1, 24, seed=9)
    q, rep = quantkern.quantize_model(copy.deepcopy(fp), None, SPEC3, method="gptq", calib=tiny_tokens(),
                                      progress=False)
    with torch.no_grad():
        a, b = fp(input_ids=ids).logits, q(input_ids=ids).logits
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert rep.forward_s > 0 and rep.solve_s > 0 and rep.total_s >= rep.forward_s + rep.solve_s


def test_registered_method_plugin_is_used():
    import dataclasses

    from quantkern import methods

    calls = {"before_layers": 0, "add": 0, "solve": []}

    @methods.register("counting")
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class CountingConfig(methods.MethodConfig):
        pass

    class Counting(driver.Plugin):
        def before_layers(self, model, samples):
            calls["before_layers"] += 1
            assert torch.is_grad_enabled()

        def add(self, collector, x_q, x_f):
            calls["add"] += 1
            super().add(collector, x_q, x_f)

        def solve(self, name, weight, collector):
            calls["solve"].append(name)
            return quantkern.solve(weight, collector.H, self.spec, method="gptq")

    driver.register_plugin(CountingConfig, Counting)
    try:
        quantkern.quantize_model(tiny_llama(), None, SPEC3, method="counting", calib=tiny_tokens(3, 16),
                                 progress=False)
    finally:
        del methods.METHODS["counting"]
    assert calls["before_layers"] == 1 and calls["add"] == 2 * 4 * 3  # blocks x groups x samples
    assert len(calls["solve"]) == 14 and calls["solve"][:3] == ["self_attn.q_proj", "self_attn.k_proj",
                                                                 "self_attn.v_proj"]
    with pytest.raises(TypeError):
        driver.register_plugin(methods.GPTQ, object)
    with pytest.raises(TypeError, match="registered"):
        driver.register_plugin(CountingConfig, Counting)  # no longer in the registry


def test_jsonl_log(tmp_path):
    import json

    log = tmp_path / "log.jsonl"
    quantkern.quantize_model(tiny_llama(), None, SPEC3, method="rtn", calib=tiny_tokens(), progress=False,
                             log_path=log)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rows) == 15 and rows[0]["layer"] == 0 and rows[0]["module"] == "self_attn.q_proj"
    assert rows[-1]["layer"] is None and rows[-1]["module"] == "lm_head"  # the default 8-bit head is logged too


def test_needs_tokenizer_for_text():
    with pytest.raises(ValueError, match="tokenizer"):
        quantkern.quantize_model(tiny_llama(), None, SPEC3, calib=["some text"], progress=False)
