"""The "loads in" rules: vLLM's (read from its source, see quantkern/models/readers.py) row by row; the
transformers/GPTQModel rows are checked against measured loads in tests/interop."""
import pytest

from quantkern.models.readers import reader_support

BASE = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 128, "sym": True}


@pytest.mark.parametrize("change,ok", [
    ({}, True),
    ({"bits": 8, "group_size": -1}, True),
    ({"group_size": 32, "desc_act": True}, True),
    ({"checkpoint_format": "gptq_v2"}, True),  # not read by vLLM's Marlin path
    ({"bits": 3}, False), ({"bits": 2}, False),  # exllama gptq_gemm removed (PR #38288)
    ({"sym": False, "checkpoint_format": "gptq_v2"}, False),  # TYPE_MAP has symmetric types only
    ({"group_size": 256}, False),  # MARLIN_SUPPORTED_GROUP_SIZES
    ({"dynamic": {r"+:.*down_proj": {"bits": 3}}}, False),  # overrides re-checked per module
    ({"dynamic": {r"+:.*down_proj": {"bits": 8, "group_size": 64}}}, True),
    ({"dynamic": {r"-:.*down_proj": {}}}, True),  # a skip rule: that module in float
])
def test_vllm_rules_from_its_source(change, ok):
    v = reader_support({**BASE, **change})["vLLM"]
    assert v.ok is ok and v.basis == "source" and "by its source" in str(v)


def test_transformers_and_gptqmodel_rules():
    assert reader_support(BASE)["transformers"].ok and reader_support(BASE)["GPTQModel"].ok
    head = reader_support({**BASE, "lm_head": True})
    assert head["transformers"].ok is False and "random" in head["transformers"].why and head["GPTQModel"].ok
    body = reader_support({**BASE, "dynamic": {r"+:.*down_proj": {"bits": 8}}})
    assert body["transformers"].ok is False and "dynamic" in body["transformers"].why
    v1_asym = reader_support({**BASE, "sym": False})
    assert v1_asym["GPTQModel"].ok is False and v1_asym["transformers"].ok
    own = reader_support({**BASE, "sym": False, "meta": {"quantizer": ["gptqmodel:7.6.0"]}})
    assert own["GPTQModel"].ok  # GPTQModel trusts its own asymmetric v1
    assert reader_support({**BASE, "checkpoint_format": "gptq_v2", "sym": False})["GPTQModel"].ok
    assert all(v.ok is False for k, v in reader_support({**BASE, "bits": 5}).items() if k != "quantkern")


def test_transformers_4bit_without_groups_on_cpu():
    v = reader_support({**BASE, "group_size": -1})
    assert v["transformers"].ok is False and "int4pack" in v["transformers"].why and v["GPTQModel"].ok
    assert reader_support({**BASE, "bits": 8, "group_size": -1})["transformers"].ok
