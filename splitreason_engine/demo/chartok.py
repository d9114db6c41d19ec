"""The demo pair's character-level tokenizer, written as a Hugging Face `tokenizer.json`.

One token per printable ASCII character and newline, so `<bigmodel>` is ten ordinary tokens and
`</bigmodel>` eleven, as in the released SplitReason model. The DeepSeek-R1 chat markers are
special tokens; `<think>` and `</think>` are added tokens that stay visible in decoded text.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
BOS, EOS, USER, ASSISTANT, UNK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                  "<｜Assistant｜>", "<unk>")
THINK = ("<think>", "</think>")


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS + [UNK])}, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in (UNK, BOS, EOS, USER, ASSISTANT)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK])
    return tok


def save_tokenizer(folder: Path) -> int:
    """Writes tokenizer.json, tokenizer_config.json and generation_config.json (greedy by default: the
    models learn exact traces); returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "unk_token": UNK, "add_bos_token": False, "model_max_length": 1024}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    generation = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS), "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)
