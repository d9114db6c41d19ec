"""Finding the offload tags in generated text, one token at a time.

Tags are text: in the released SplitReason model `<bigmodel>` spans several tokens and tokenizes
differently after a space or a newline, and the close tag has more than one spelling. Detection is
therefore exact on bytes: an Aho-Corasick automaton over every tag spelling, folded into per-token
tables (state x token -> next state, flags), so each sampled token costs one table lookup. A
checkpoint that defines a tag as one special token needs nothing else: that token's bytes are the
tag.
"""

import json
from dataclasses import dataclass

import numpy as np

from .tokenizer import Tokenizer

OPEN = 1  # an open-tag spelling ended inside this token
CLOSE = 2  # a close-tag spelling ended inside this token


@dataclass(frozen=True)
class Tags:
    open: tuple[str, ...] = ("<bigmodel>",)
    # The reference's training traces close with `<\bigmodel>`; its inference code looks for `</big`.
    close: tuple[str, ...] = ("</bigmodel>", "<\\bigmodel>")

    def __post_init__(self):
        if not self.open or not self.close or any(not t for t in self.open + self.close):
            raise ValueError("tags: need at least one non-empty open and one non-empty close spelling")

    @property
    def all(self) -> tuple[str, ...]:
        return self.open + self.close

    def strip(self, text: str) -> str:
        """The text with every tag spelling removed (what the big model reads)."""
        for tag in self.all:
            text = text.replace(tag, "")
        return text

    def partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some tag: characters
        that may yet turn into a tag."""
        for n in range(min(len(text), max(map(len, self.all)) - 1), 0, -1):
            if any(t.startswith(text[-n:]) and len(t) > n for t in self.all):
                return n
        return 0


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-unicode map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The exact bytes each token id contributes to the decoded text."""
    tok = tokenizer.hf
    added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel"
    table = _byte_decoder() if byte_level else None
    out = []
    for i in range(tokenizer.vocab_size):
        if i in added:
            out.append(added[i].encode())
        elif byte_level:
            piece = tok.id_to_token(i) or ""
            out.append(bytes(table[c] for c in piece if c in table))
        else:
            out.append(tok.decode([i], skip_special_tokens=False).encode())
    return out


class TagDetector:
    """Per-token transition tables of an Aho-Corasick automaton over the tag spellings.

    State 0 is "no partial tag". `step(state, token)` gives the state after the token's bytes and
    OPEN / CLOSE flags for tag spellings completed inside the token. `closing[state]` is true where
    the text read so far ends in a proper prefix of a close spelling (a close tag may be starting).
    """

    def __init__(self, tags: Tags, pieces: list[bytes]):
        self.tags = tags
        delta, out, closing = _automaton([(t.encode(), OPEN) for t in tags.open] + [(t.encode(), CLOSE) for t in tags.close])
        self.closing = closing
        self.max_close_bytes = max(len(t.encode()) for t in tags.close)
        num_states, vocab = delta.shape[0], len(pieces)
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        state = np.repeat(np.arange(num_states, dtype=np.int32)[:, None], vocab, axis=1)
        flags = np.zeros((num_states, vocab), dtype=np.uint8)
        # Walk every (state, token) pair through the token's bytes at once, position by position;
        # only tokens at least that long take part, so the work is states x total bytes.
        for j in range(int(lengths.max(initial=0))):
            active = np.nonzero(lengths > j)[0]
            byte = flat[offsets[active] + j]
            nxt = delta[state[:, active], byte[None, :]]
            state[:, active] = nxt
            flags[:, active] |= out[nxt]
        self.next_state, self.flags = state, flags

    def step(self, state: int, token: int) -> tuple[int, int]:
        return int(self.next_state[state, token]), int(self.flags[state, token])


def _automaton(patterns: list[tuple[bytes, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(delta [states, 256], output flags [states], closing [states]) of the patterns' DFA."""
    children: list[dict[int, int]] = [{}]
    out = [0]
    closing = [False]
    for pattern, flag in patterns:
        node = 0
        for depth, byte in enumerate(pattern):
            if byte not in children[node]:
                children[node][byte] = len(children)
                children.append({})
                out.append(0)
                closing.append(False)
            node = children[node][byte]
            if flag == CLOSE and depth + 1 < len(pattern):
                closing[node] = True
        out[node] |= flag
    delta = np.zeros((len(children), 256), dtype=np.int32)
    fail = [0] * len(children)
    queue = []
    for byte, child in children[0].items():
        delta[0, byte] = child
        queue.append(child)
    while queue:  # breadth first: a node's failure target is complete before the node is
        node = queue.pop(0)
        out[node] |= out[fail[node]]
        delta[node] = delta[fail[node]]
        for byte, child in children[node].items():
            fail[child] = delta[fail[node], byte] if node else 0
            delta[node, byte] = child
            queue.append(child)
    return delta, np.array(out, dtype=np.uint8), np.array(closing, dtype=bool)
