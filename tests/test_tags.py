"""The tag detector against Python string search on the decoded bytes.

A byte-level BPE is trained here on text with the tags in many contexts (after spaces, newlines,
punctuation, inside words), so tags span several tokens and tokenize differently by context; then
thousands of random token sequences (and real encodings of tagged text) are run through the
detector token by token.
"""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from splitreason_engine.tags import CLOSE, OPEN, TagDetector, Tags, token_bytes
from splitreason_engine.tokenizer import Tokenizer as EngineTokenizer

TAGS = Tags()
WORDS = ["the", "sum", "is", "prime", "x", "=", "42", "\\boxed{7}", "so", "(", ")", "<", ">", "/", "\\", "big",
         "model", "<b", "ig", "</", "mod", "el>"]


def corpus(rng: random.Random, n: int = 400) -> list[str]:
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 20)):
            r = rng.random()
            if r < 0.15:
                parts.append(rng.choice(TAGS.all))
            else:
                parts.append(rng.choice(WORDS))
        lines.append("".join(p + rng.choice(["", " ", "\n", "  ", "."]) for p in parts))
    return lines


@pytest.fixture(scope="module", params=["text tags", "special tags"])
def tokenizer(request, tmp_path_factory) -> EngineTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(corpus(random.Random(0)), trainer)
    if request.param == "special tags":
        tok.add_special_tokens(["<bigmodel>", "</bigmodel>"])
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(str(folder / "tokenizer.json"))
    return EngineTokenizer(folder)


def reference_bytes(tok: EngineTokenizer) -> list[bytes]:
    """Each token's bytes, worked out independently of tags.token_bytes."""
    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    added = {i: t.content for i, t in tok.hf.get_added_tokens_decoder().items()}
    return [added[i].encode() if i in added else bytes(unbyte[c] for c in tok.hf.id_to_token(i))
            for i in range(tok.vocab_size)]


def expected_flags(pieces: list[bytes]) -> list[int]:
    """Per token: OPEN / CLOSE if a spelling of that tag ends inside the token (string search)."""
    text = b"".join(pieces)
    ends = {}
    for flag, spellings in ((OPEN, TAGS.open), (CLOSE, TAGS.close)):
        for tag in map(str.encode, spellings):
            i = text.find(tag)
            while i >= 0:
                ends[i + len(tag) - 1] = ends.get(i + len(tag) - 1, 0) | flag
                i = text.find(tag, i + 1)
    flags, pos = [], 0
    for p in pieces:
        flags.append(0)
        for j in range(pos, pos + len(p)):
            flags[-1] |= ends.get(j, 0)
        pos += len(p)
    return flags


def may_close(text: bytes) -> bool:
    tags = [t.encode() for t in TAGS.all]
    for n in range(min(len(text), max(map(len, tags))), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return any(t.startswith(text[-n:]) and len(t) > n for t in map(str.encode, TAGS.close))
    return False


def test_token_bytes_match_an_independent_decoding(tokenizer):
    assert token_bytes(tokenizer) == reference_bytes(tokenizer)


def test_detector_agrees_with_string_search(tokenizer):
    pieces = reference_bytes(tokenizer)
    detector = TagDetector(TAGS, token_bytes(tokenizer))
    rng = random.Random(1)
    # Tag-ish tokens drawn often, so tags complete across token boundaries many times.
    taggy = [i for i, p in enumerate(pieces) if p and set(p) <= set(b"<>/\\bigmodel ")]
    sequences = [[rng.choice(taggy) if rng.random() < 0.7 else rng.randrange(len(pieces)) for _ in range(40)]
                 for _ in range(2500)]
    sequences += [tokenizer.encode(line, add_special_tokens=False) for line in corpus(random.Random(2), 300)]
    hits = {OPEN: 0, CLOSE: 0}
    for seq in sequences:
        want = expected_flags([pieces[t] for t in seq])
        state, text = 0, b""
        for k, token in enumerate(seq):
            state, flags = detector.step(state, token)
            text += pieces[token]
            assert flags == want[k], (seq[: k + 1], text)
            assert bool(detector.closing[state]) == may_close(text)
            hits[OPEN] += bool(flags & OPEN)
            hits[CLOSE] += bool(flags & CLOSE)
    assert hits[OPEN] > 100 and hits[CLOSE] > 100


def test_tags_span_several_tokens_and_depend_on_context(tokenizer):
    if tokenizer.hf.token_to_id("<bigmodel>") is not None:
        assert tokenizer.encode("<bigmodel>", add_special_tokens=False) == [tokenizer.hf.token_to_id("<bigmodel>")]
        return
    alone = tokenizer.encode("<bigmodel>", add_special_tokens=False)
    after_space = tokenizer.encode(" <bigmodel>", add_special_tokens=False)
    assert len(alone) > 1 and after_space[-len(alone):] != alone


def test_strip_and_partial_suffix():
    assert TAGS.strip("a<bigmodel>b</bigmodel>c<\\bigmodel>") == "abc"
    assert TAGS.partial_suffix("so </bigmo") == len("</bigmo")
    assert TAGS.partial_suffix("x <") == 1 and TAGS.partial_suffix("done.") == 0
    assert TAGS.partial_suffix("a<bigmodel>") == 0  # complete, not partial
    with pytest.raises(ValueError):
        Tags(open=())
