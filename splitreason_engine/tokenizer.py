"""Text <-> token ids for a checkpoint folder (its tokenizer.json), and incremental detokenizing."""

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """A Hugging Face fast tokenizer read from `tokenizer.json`, without transformers."""

    def __init__(self, folder: Path):
        path = Path(folder) / "tokenizer.json"
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"cannot read tokenizer {path}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = _eos_ids(Path(folder), self._tok)
        self._hidden = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    @property
    def hf(self) -> _HFTokenizer:
        return self._tok

    def keep_in_text(self, strings) -> None:
        """Special tokens spelled as one of `strings` (offload tags) stay visible in decoded text."""
        keep = set(strings)
        self._hidden = {i for i in self._hidden if self._tok.id_to_token(i) not in keep}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens` applies the tokenizer's post-processor (a BOS, for some); prompt
        templates that spell their markers out pass False."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens (EOS, chat markers), except those kept by keep_in_text."""
        return self._tok.decode([i for i in ids if i not in self._hidden], skip_special_tokens=False)

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        return self._tok.get_vocab(with_added_tokens=True) == other._tok.get_vocab(with_added_tokens=True)


def _eos_ids(folder: Path, tok: _HFTokenizer) -> tuple[int, ...]:
    """EOS from generation_config.json if present, else tokenizer_config.json's eos_token."""
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return (tok.token_to_id(eos),)
    return ()


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8 sequences.

    Each call decodes only a short window (from the last emitted boundary), not the whole text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, tokens: list[int]) -> str:
        prefix = self.tokenizer.decode(tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
            return full[len(prefix):]
        return ""
