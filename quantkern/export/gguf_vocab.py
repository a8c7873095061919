"""A Hugging Face BPE tokenizer as llama.cpp's converter writes it (tokenizer.ggml.*).

llama.cpp re-implements each model family's pre-tokenizer (the regex split before BPE) and finds the
right one by name, `tokenizer.ggml.pre`. Its converter names it by hashing the token ids of one fixed
probe text; we do the same, with the hashes of the Llama-family tokenizers (data from llama.cpp's
convert_hf_to_gguf.py). Another tokenizer is refused unless the caller names its pre-tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf


class VocabError(ValueError):
    pass


# llama.cpp's probe text: whitespace runs, emoji with joiners, digits, Khmer, CJK, Cyrillic, quotes, contractions
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
          "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
          "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
          "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
          "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
          "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
          "make it, 'D you like some tea? We'Ve a'lL")

KNOWN_PRE = {  # sha256 of str(tokenizer.encode(CHKTXT)) -> llama.cpp's pre-tokenizer name
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def probe_hash(tokenizer) -> str:
    return hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def _looks_special(text: str) -> bool:
    # the converter's heuristic: some models leave control tokens like <|im_end|> unmarked
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))


class BpeVocab:
    """Everything tokenizer.ggml.* needs, gathered (and checked) before any file is written."""

    def __init__(self, model_dir, vocab_size: int, tokenizer_pre: str | None = None):
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        tj = model_dir / "tokenizer.json"
        if (model_dir / "tokenizer.model").exists() or not tj.exists():
            raise VocabError(f"{model_dir}: only Hugging Face BPE tokenizers (tokenizer.json: SmolLM, Llama 3) are "
                             "exported; SentencePiece tokenizers (tokenizer.model: Llama 1/2) are not supported yet")
        model = json.loads(tj.read_text()).get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise VocabError(f"{model_dir}: tokenizer.json holds a {model.get('type')} model"
                             f"{' with byte_fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}; "
                             "only byte-level BPE tokenizers (SmolLM, Llama 3) are exported")
        tok = AutoTokenizer.from_pretrained(model_dir)
        self.pre = tokenizer_pre or KNOWN_PRE.get(probe_hash(tok))
        if self.pre is None:
            raise VocabError(f"{model_dir}: llama.cpp does not know this tokenizer's pre-tokenizer (probe hash "
                             f"{probe_hash(tok)}); name it with --tokenizer-pre NAME (llama.cpp's name, e.g. "
                             f"{', '.join(sorted(set(KNOWN_PRE.values())))}, or 'default')")
        vocab = tok.get_vocab()
        if vocab and max(vocab.values()) >= vocab_size:
            raise VocabError(f"tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
        by_id = {i: t for t, i in vocab.items()}
        added = tok.get_added_vocab()
        decoder = tok.added_tokens_decoder
        self.tokens, self.types = [], []
        for i in range(vocab_size):  # ids the tokenizer lacks pad the table, as the embedding has rows for them
            text = by_id.get(i)
            if text is None:
                self.tokens.append(f"[PAD{i}]")
                self.types.append(gguf.TokenType.UNUSED)
                continue
            kind = gguf.TokenType.NORMAL
            if text in added:
                special = decoder[i].special if i in decoder else False
                kind = gguf.TokenType.CONTROL if special or _looks_special(text) else gguf.TokenType.USER_DEFINED
            self.tokens.append(text)
            self.types.append(kind)
        # merges, bos/eos/unk/pad ids, add_bos_token, chat template: gguf's own reader of the HF files
        self.special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
        tc = model_dir / "tokenizer_config.json"
        self.add_space_prefix = json.loads(tc.read_text()).get("add_prefix_space") if tc.exists() else None
        if "bos" not in self.special.add_special_token:
            # transformers 5 no longer saves add_bos_token; llama.cpp must prepend BOS exactly when the HF
            # tokenizer does, so say what it does
            ids = tok.encode("a")
            self.special.add_special_token["bos"] = bool(ids) and ids[0] == tok.bos_token_id

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)
