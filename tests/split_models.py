"""A tiny random model pair for split-mode tests, and the protocol oracle.

The pair shares a byte-level BPE tokenizer with a few merges, so the tags are several tokens and
tokenize differently after a space (`<` vs `Ġ<`); a variant also defines the tags as single
special tokens. The oracle is a plain implementation of the SplitReason protocol on Hugging Face
models that recomputes every view from scratch for every token (no KV cache) and finds tags with
Python byte-string search.
"""

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hf_models import save_tiny_qwen2
from splitreason_engine import Engine, SamplingParams
from splitreason_engine.engine import default_model_path

OPEN_TAGS = ("<bigmodel>",)
CLOSE_TAGS = ("</bigmodel>", "<\\bigmodel>")
MERGES = [("Ġ", "<"), ("Ġ<", "/"), ("<", "/"), ("b", "i"), ("bi", "g"), ("m", "o"), ("mo", "d"), ("mod", "e"),
          ("mode", "l")]
SMALL_VOCAB, BIG_VOCAB = 288, 320  # padded embedding rows differ, like 151936 vs 152064


def write_tokenizer(folder: Path, special_tags: bool) -> None:
    spec = json.loads((default_model_path() / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    next_id = len(vocab)  # merged tokens extend the byte vocabulary; added tokens come after them
    for a, b in MERGES:
        vocab[a + b] = next_id
        next_id += 1
    spec["model"]["merges"] = [f"{a} {b}" for a, b in MERGES]
    for t in spec["added_tokens"]:
        t["id"] = next_id
        next_id += 1
    if special_tags:
        for tag in OPEN_TAGS[:1] + CLOSE_TAGS[:1]:
            spec["added_tokens"].append(dict(id=next_id, content=tag, single_word=False, lstrip=False,
                                             rstrip=False, normalized=False, special=True))
            next_id += 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    shutil.copy(default_model_path() / "tokenizer_config.json", folder / "tokenizer_config.json")


def save_pair(root: Path, special_tags: bool) -> tuple[Path, Path]:
    """(small, big): 2 layers of hidden 64 and 3 layers of hidden 96, one tokenizer. With text tags
    the small model is steered to finish any tag it starts (see steer_to_finish_tags)."""
    if special_tags:
        small = save_tiny_qwen2(root / "small", "mha-tied-1e4", seed=11, vocab_size=SMALL_VOCAB, num_layers=2)
    else:
        small = save_tiny_qwen2(root / "small", "gqa2-untied-1e6", seed=11, vocab_size=SMALL_VOCAB, num_layers=2)
    big = save_tiny_qwen2(root / "big", "gqa6-h96-tied", seed=12, vocab_size=BIG_VOCAB, num_layers=3)
    for folder in (small, big):
        write_tokenizer(folder, special_tags)
    if not special_tags:
        steer_to_finish_tags(small)
    return small, big


def save_near_pair(root: Path, small: Path, noise: float) -> tuple[Path, Path]:
    """(small, big): the big model is a copy of `small` with Gaussian noise of `noise` times each
    weight's standard deviation added, so the small model's drafts are often (not always) what the
    big model would write: drafting's acceptance and rejection paths both run."""
    from safetensors.torch import load_file, save_file

    big = root / "near_big"
    shutil.copytree(small, big)
    g = torch.Generator().manual_seed(13)
    weights = load_file(str(small / "model.safetensors"))
    weights = {k: w + noise * w.float().std().nan_to_num() * torch.randn(w.shape, generator=g) if w.dim() > 1 else w
               for k, w in weights.items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(big / "model.safetensors"), metadata={"format": "pt"})
    return small, big


def steer_to_finish_tags(folder: Path) -> None:
    """Makes a random untied model write `big`, `model`, `>` after any `<`-like token, by giving the
    embeddings unit scale, shrinking what the layers add to the residual, and adding the previous
    token's embedding to the output row of its successor. A logit_bias on `<`, `Ġ<`, `</` then
    decides how often tags start; once started they complete (open or close, by the first token),
    or, for `<` during a big segment, start a probe that fails at `big`."""
    from safetensors.torch import load_file, save_file

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tid = tok.token_to_id
    weights = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    embed = torch.randn(weights["model.embed_tokens.weight"].shape, generator=g)
    weights["model.embed_tokens.weight"] = embed
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = w * 0.15
    head = weights["lm_head.weight"]
    starts = ["<", "Ġ<", "</", "Ġ</"]
    for prev, nxt in [*((s, "big") for s in starts), ("big", "model"), ("model", ">")]:
        e = embed[tid(prev)]
        head[tid(nxt)] += 10 * e / e.dot(e)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


@dataclass
class Request:
    question: str
    mode: str
    max_tokens: int
    logit_bias: dict = field(default_factory=dict)
    max_offload_tokens: int = 512
    switch_ratio: float = 1.0
    switch_chunk: int = 16
    seed: int = 0


class Oracle:
    """Greedy SplitReason on Hugging Face models, everything recomputed at every token."""

    TEMPLATE = "<｜begin▁of▁sentence｜><｜User｜>{question}\n{hint}{terminating}<｜Assistant｜>\n<think>\n"
    HINT = "You always use <bigmodel>...</bigmodel> to mark parts of the reasoning process that are important.\n"
    TERMINATING = "\n Put your final answer within \\boxed{}."

    def __init__(self, small: Path, big: Path):
        from transformers import Qwen2ForCausalLM

        self.models = [Qwen2ForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (small, big)]
        self.tok = Tokenizer.from_file(str(small / "tokenizer.json"))
        self.vocab = self.tok.get_vocab_size(with_added_tokens=True)
        added = {i: t for i, t in self.tok.get_added_tokens_decoder().items()}
        self.hidden = {i for i, t in added.items() if t.special and t.content not in OPEN_TAGS + CLOSE_TAGS}
        if json.loads(self.tok.to_str()).get("decoder", {}).get("type") == "ByteLevel":
            unbyte = {c: b for b, c in bytes_to_unicode().items()}
            piece = lambda i: bytes(unbyte[c] for c in self.tok.id_to_token(i))  # noqa: E731
        else:  # one character per token (the demo pair)
            piece = lambda i: self.tok.id_to_token(i).encode()  # noqa: E731
        self.bytes = [added[i].content.encode() if i in added else piece(i) for i in range(self.vocab)]
        generation = small / "generation_config.json"
        eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
        self.eos = eos if eos is not None else self.tok.token_to_id("<|endoftext|>")
        self._runs: dict[str, tuple[list[int], list[int]]] = {}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.hidden], skip_special_tokens=False)

    @torch.no_grad()
    def next_token(self, model: int, view: list[int], bias: dict) -> int:
        logits = self.models[model](torch.tensor([view])).logits[0, -1, :self.vocab].clone()
        for token, b in bias.items():
            logits[token] += b
        return int(logits.argmax())

    @staticmethod
    def ends_tag(text: bytes, new: int, tags) -> bool:
        """Whether a tag spelling ends within the last `new` bytes of `text`."""
        return any(text.find(t.encode(), max(0, len(text) - new - len(t.encode()) + 1)) >= 0 for t in tags)

    @staticmethod
    def may_close(text: bytes) -> bool:
        """The longest suffix of `text` that begins some tag is a proper prefix of a close tag."""
        tags = [t.encode() for t in OPEN_TAGS + CLOSE_TAGS]
        for n in range(min(len(text), max(map(len, tags))), 0, -1):
            suffix = text[-n:]
            if any(t.startswith(suffix) for t in tags):
                return any(t.startswith(suffix) and len(t) > n for t in map(str.encode, CLOSE_TAGS))
        return False

    def run(self, r: Request) -> tuple[list[int], list[int]]:
        """(token ids, writer of each token: 0 small, 1 big); remembered, as many tests ask again."""
        key = repr(r)
        if key not in self._runs:
            self._runs[key] = self._run(r)
        return self._runs[key]

    def _run(self, r: Request) -> tuple[list[int], list[int]]:
        if r.mode in ("small", "big"):
            view, m = self.encode(r.question), int(r.mode == "big")
            out = []
            while True:
                t = self.next_token(m, view + out, r.logit_bias)
                out.append(t)
                if t == self.eos or len(out) >= r.max_tokens:
                    return out, [m] * len(out)
        small = self.encode(self.TEMPLATE.format(question=r.question, hint=self.HINT, terminating=self.TERMINATING))
        big = self.encode(self.TEMPLATE.format(question=r.question, hint="", terminating=self.TERMINATING))
        return self._random(r, small, big) if r.mode == "random" else self._split(r, small, big)

    def _random(self, r, small, big):
        rng = random.Random(r.seed)
        draw = lambda: int(rng.random() < 1 / (r.switch_ratio + 1))  # noqa: E731
        writer, out, who = draw(), [], []
        while True:
            t = self.next_token(writer, (small, big)[writer] + out, r.logit_bias)
            out.append(t)
            who.append(writer)
            if t == self.eos or len(out) >= r.max_tokens:
                return out, who
            if len(out) % r.switch_chunk == 0:
                writer = draw()

    def _split(self, r, small, big):
        out, who = [], []
        gen = b""  # the small view's generated text, as bytes
        seg_start = 0

        def commit(t, m):
            nonlocal gen
            out.append(t)
            who.append(m)
            gen += self.bytes[t]
            return t != self.eos and len(out) < r.max_tokens

        while True:  # small segment
            t = self.next_token(0, small + out, r.logit_bias)
            if not commit(t, 0):
                return out, who
            if not self.ends_tag(gen, len(self.bytes[t]), OPEN_TAGS):
                continue
            text = self.decode(out[seg_start:])
            for tag in OPEN_TAGS + CLOSE_TAGS:
                text = text.replace(tag, "")
            big += self.encode(text)
            seg_big = 0
            while True:  # big segment
                b = self.next_token(1, big, r.logit_bias)
                if not commit(b, 1):
                    return out, who
                big = big + [b]
                seg_big += 1
                if seg_big >= r.max_offload_tokens:
                    seg_start = len(out)
                    for t in self.encode(CLOSE_TAGS[0]):
                        if not commit(t, 0):
                            return out, who
                    break
                probe = []
                while True:
                    p = self.next_token(0, small + out + probe, r.logit_bias)
                    text = gen + b"".join(self.bytes[t] for t in probe) + self.bytes[p]
                    if self.ends_tag(text, len(self.bytes[p]), CLOSE_TAGS):
                        probe.append(p)
                        break
                    if not self.may_close(text) or len(probe) + 1 > max(len(t) for t in CLOSE_TAGS):
                        probe = None
                        break
                    probe.append(p)
                if probe is not None:
                    seg_start = len(out)
                    for t in probe:
                        if not commit(t, 0):
                            return out, who
                    break


# ---- what the split-mode tests share ------------------------------------------------------------

PAGE_BYTES = 16 * 1024  # 16 tokens of the small model (2 layers x K,V x 4 heads x 16 dims x 4 bytes)
QUESTIONS = ["What is 2+2?", "Name a prime.", "x", "Why is the sky blue? Think step by step.",
             "Sum 17 and 25", "a b c d", "Is 91 prime?", "Count to five"]


def ids(oracle: Oracle) -> dict[str, int]:
    return {name: oracle.tok.token_to_id(name) for name in ("<bigmodel>", "</bigmodel>", "<", "<|endoftext|>")}


def mixed_requests(oracle: Oracle) -> list[Request]:
    """Twelve requests over all four modes; split ones with different handoff rates and caps."""
    t = ids(oracle)
    no_eos = {t["<|endoftext|>"]: -5.0}
    split_biases = [(2, 3, 3), (1.5, 3, 3.5), (3, 2, 0), (2, 4, 2), (2.5, 3, 3), (3, 5, 4)]
    reqs = [Request(QUESTIONS[i], "split", 48, {t["<bigmodel>"]: a, t["</bigmodel>"]: b, t["<"]: c, **no_eos},
                    max_offload_tokens=(512, 4, 512, 7, 512, 512)[i]) for i, (a, b, c) in enumerate(split_biases)]
    reqs += [Request(QUESTIONS[6], "random", 40, no_eos, switch_ratio=1.0, switch_chunk=5, seed=3),
             Request(QUESTIONS[7], "random", 40, no_eos, switch_ratio=0.5, switch_chunk=3, seed=4),
             Request(QUESTIONS[0], "small", 24, no_eos), Request(QUESTIONS[1], "big", 24, no_eos),
             Request(QUESTIONS[2], "small", 30), Request(QUESTIONS[3], "big", 30)]
    return reqs


def params_for(r: Request) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=r.max_tokens, logit_bias=r.logit_bias, mode=r.mode,
                          max_offload_tokens=r.max_offload_tokens, switch_ratio=r.switch_ratio,
                          switch_chunk=r.switch_chunk, seed=r.seed)


def check_against_oracle(engine: Engine, oracle: Oracle, reqs: list[Request]) -> list:
    outs = engine.generate([r.question for r in reqs], [params_for(r) for r in reqs], use_tqdm=False)
    for r, out in zip(reqs, outs):
        tokens, writers = oracle.run(r)
        assert out.error is None
        assert out.token_ids == tokens, f"{r.mode} request {r.question!r} differs from the oracle"
        assert out.token_models == writers
        m = out.metrics
        assert m.small_tokens + m.big_tokens == len(tokens) and m.big_tokens == sum(writers)
        if r.mode == "split":
            starts = sum(1 for a, b in zip([0] + writers, writers) if (a, b) == (0, 1))
            assert m.handoffs >= starts and len(m.handoff_latencies) == starts
            assert all(x >= 0 for x in m.handoff_latencies)
        if r.mode in ("small", "big"):
            assert m.handoffs == 0 and set(writers) == {int(r.mode == "big")}
    assert engine.scheduler.num_free_pages == engine.pool.num_pages
    return outs
