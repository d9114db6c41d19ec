"""Token log-probabilities in the OpenAI API's two shapes: the completions object (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`) and the chat one (`content[]` entries with
`token`, `logprob`, `bytes`, `top_logprobs`). Each token also names the model that wrote it
(extension: `token_models` in completions, `model` per chat entry; None for echoed prompt tokens).
"""

from .requests import MODEL_NAMES
from .tags import token_bytes
from .tokenizer import Tokenizer


class TokenText:
    """Each token id's exact bytes and their text (invalid UTF-8, such as part of a character,
    replaced), as the shapes name tokens; the table is built on first use."""

    def __init__(self, tokenizer: "Tokenizer | None"):
        self.tokenizer, self._bytes = tokenizer, None

    def bytes(self, token: int) -> bytes:
        if self.tokenizer is None:
            return str(token).encode()
        if self._bytes is None:
            self._bytes = token_bytes(self.tokenizer)
        return self._bytes[token] if token < len(self._bytes) else b""

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", "replace")


def _model_names(models: list) -> list:
    return [None if m is None else MODEL_NAMES[m] for m in models]


def completion_logprobs(names: TokenText, ids: list[int], logprobs: list, tops: list, models: list,
                        offset: int) -> tuple[dict, int]:
    """The completions `logprobs` object of these tokens, and the text offset after them.
    `tops[i]`: [(id, logprob)], or None where a token has no alternatives (the first prompt token,
    a forced close tag, whose logprob is None too)."""
    texts = [names.text(t) for t in ids]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top = [None if alts is None else {names.text(t): v for t, v in alts} for alts in tops]
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets,
            "token_models": _model_names(models)}, offset


def chat_logprobs(names: TokenText, ids: list[int], logprobs: list, tops: list, models: list) -> dict:
    """The chat `logprobs` object of these tokens."""
    def entry(token: int, value: float) -> dict:
        raw = names.bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": value, "bytes": list(raw)}

    content = [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alts or ()], "model": model}
               for t, lp, alts, model in zip(ids, logprobs, tops, _model_names(models))]
    return {"content": content, "refusal": None}
