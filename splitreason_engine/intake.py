"""Request intake: a prompt and its SamplingParams checked, templated (split and random modes),
turned into a Request with its protocol flow, and queued in the scheduler. Every refusal is a
ValueError that names the problem, raised before anything is queued."""

from typing import Union

from .drafting import DraftingBigFlow, DraftingRandomFlow, DraftingSplitFlow
from .outputs import RequestMetrics
from .protocol import PromptTemplate, RandomFlow, SingleFlow, SplitFlow
from .requests import BIG, SMALL, FlowContext, Request
from .sampling import SamplingParams
from .speculation import DraftTuner
from .tokenizer import Tokenizer

Prompt = Union[str, list[int]]


class RequestIntake:
    def __init__(self, flows: FlowContext, template: PromptTemplate, real_vocab: list[int], max_model_len: int,
                 eos_token_ids: list[int], seed: int, clock):
        self.flows, self.template, self.real_vocab = flows, template, real_vocab
        self.max_model_len, self.eos_token_ids, self.seed, self.clock = max_model_len, eos_token_ids, seed, clock
        self.tokenizer: "Tokenizer | None" = flows.tokenizer
        self.scheduler, self.requests = flows.book.scheduler, flows.book.live
        self.num_models = flows.num_models
        self.next_id = 0


    def _tuner(self, params: SamplingParams, mode: str) -> "DraftTuner | None":
        """The request's drafting (SamplingParams.speculate, else the engine's), or None: no drafts.
        Big segments, random mode's big chunks and big mode draft; small mode has nothing to draft."""
        speculate = self.flows.speculate if params.speculate is None else params.speculate
        if speculate != 0 and self.num_models < 2:
            raise ValueError(f"speculate={speculate} needs a big model to verify and a small one to draft; this engine "
                             "has one model")
        if speculate == 0 or mode == "small":
            return None
        return DraftTuner(speculate, self.flows.costs, self.flows.max_drafts, decisions=mode == "split")

    def _mode(self, params: SamplingParams) -> str:
        mode = params.mode or ("split" if self.num_models > 1 else "small")
        if mode != "small" and self.num_models < 2:
            raise ValueError(f"mode {mode!r} needs a big model: Engine(small=..., big=...)")
        return mode

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass the prompt as a list of token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def _check_prompt(self, ids: list[int], vocab: int, what: str = "prompt") -> None:
        if not ids:
            raise ValueError(f"empty {what}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{what} of {len(ids)} tokens is too long: this engine's context is "
                             f"max_model_len={self.max_model_len} tokens, prompt plus at least one new token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def add(self, prompt: Prompt, params: SamplingParams, index: int = 0, copy_from: "int | None" = None) -> int:
        """Queues one prompt; raises ValueError naming the problem if it cannot be served.

        In split and random modes the prompt is the question, a string, put into the template.
        `copy_from`: the request whose computed prompt KV it copies (Engine.add_request's sample_of)."""
        params.validate()
        mode = self._mode(params)
        vocab = min(self.real_vocab)
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token id {max(params.logit_bias)} is outside the vocabulary [0, {vocab})")
        if params.prompt_logprobs is not None and mode not in ("small", "big"):
            raise ValueError(f"prompt_logprobs needs mode 'small' or 'big': mode {mode!r} puts the prompt into a "
                             "template, so its tokens are not the text given")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        rid = self.next_id
        metrics = RequestMetrics(self.clock.now(), mode=mode)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_token_ids))
        req = Request(rid, index, [], params, metrics, stop_ids)
        tuner = self._tuner(params, mode)
        if mode in ("small", "big"):
            model = SMALL if mode == "small" else BIG
            req.prompt = self._tokenize(prompt)
            self._check_prompt(req.prompt, self.real_vocab[model])
            if params.prompt_logprobs is not None:
                req.prompt_model, req.prompt_logprobs = model, [None] * len(req.prompt)
            if tuner is not None and max(req.prompt) < self.real_vocab[SMALL]:
                req.flow = DraftingBigFlow(self.flows, req, tuner)
            else:
                req.flow = SingleFlow(self.flows, req, model)
        else:
            if not isinstance(prompt, str) or self.tokenizer is None:
                raise ValueError(f"mode {mode!r} needs the question as a string (it is put into the prompt template)")
            small_ids = self.tokenizer.encode(self.template.small(prompt), add_special_tokens=False)
            big_ids = self.tokenizer.encode(self.template.big(prompt), add_special_tokens=False)
            self._check_prompt(small_ids, vocab, "templated prompt")
            self._check_prompt(big_ids, vocab, "templated prompt")
            req.prompt = small_ids
            if mode == "split" and tuner is not None:
                req.flow = DraftingSplitFlow(self.flows, req, small_ids, big_ids, tuner)
            elif mode == "split":
                req.flow = SplitFlow(self.flows, req, small_ids, big_ids)
            else:
                seed = params.seed if params.seed is not None else self.seed * 1_000_003 + rid
                req.flow = (DraftingRandomFlow(self.flows, req, small_ids, big_ids, seed, tuner) if tuner is not None
                            else RandomFlow(self.flows, req, small_ids, big_ids, seed))
        metrics.num_prompt_tokens = len(req.prompt)
        scores = req.prompt_model is not None
        self.scheduler.add_request(rid, *req.flow.initial_views(), reads_cache=not scores,
                                   copy_from=-1 if copy_from is None else copy_from)
        self.next_id += 1
        self.requests[rid] = req
        if scores and len(req.prompt) > 1:  # a one-token prompt has no position to score
            self.flows.book.scoring.add(rid)
        return rid
