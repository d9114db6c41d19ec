"""What evaluation clients send, through the openai client against a real `splitreason serve` on
the shipped demo pair over loopback: n samples, log-probabilities with alternatives, echo with
prompt log-probabilities, lists of prompts; streamed and not. Values are checked against the
library engine on the same checkpoints (test_logprobs.py checks those against transformers)."""

import openai
import pytest

from splitreason_engine import Engine, SamplingParams
from splitreason_engine.demo import pair_paths
from splitreason_engine.demo.task import evaluation_problems
from test_server import Server

TOL = 1e-5
MODEL = "splitreason-demo"


@pytest.fixture(scope="module")
def server():
    s = Server("--kv-cache-bytes", str(1 << 24))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def library():
    return Engine(*pair_paths(), kv_cache_bytes=1 << 24, progress=False)


QUESTIONS = [p.question for p in evaluation_problems(3, seed=6)]


def streamed_choices(stream) -> dict[int, dict]:
    """Per choice index: its text, tokens' logprobs and models, and finish reason, from the chunks."""
    choices: dict[int, dict] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"text": "", "logprobs": [], "tokens": [], "finish": None})
            got["text"] += c.text if hasattr(c, "text") else (c.delta.content or "")
            if c.logprobs is not None:
                lp = c.logprobs
                if hasattr(lp, "token_logprobs"):
                    got["logprobs"] += lp.token_logprobs
                    got["tokens"] += lp.tokens
                else:
                    got["logprobs"] += [e.logprob for e in lp.content]
                    got["tokens"] += [e.token for e in lp.content]
            got["finish"] = c.finish_reason or got["finish"]
    return {**choices, "usage": usage}


def test_n_samples_each_equal_a_single_request_with_its_derived_seed(client):
    """Choice j of n=4 seeded with s is the request seeded with s + j; streamed equals not;
    usage counts the prompt once and every sample's tokens."""
    body = dict(model=MODEL, prompt=QUESTIONS[0], n=4, seed=11, temperature=3.0, max_tokens=60)
    whole = client.completions.create(**body)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    texts = [c.text for c in whole.choices]
    assert len(set(texts)) > 1
    for j, text in enumerate(texts):
        single = client.completions.create(**{**body, "n": 1, "seed": 11 + j})
        assert single.choices[0].text == text
    streamed = streamed_choices(client.completions.create(**body, stream=True,
                                                          stream_options={"include_usage": True}))
    assert [streamed[j]["text"] for j in range(4)] == texts
    u = whole.usage
    single_prompt = client.completions.create(**{**body, "n": 1}).usage.prompt_tokens
    assert u.prompt_tokens == single_prompt
    lengths = [client.completions.create(**{**body, "n": 1, "seed": 11 + j}).usage.completion_tokens for j in range(4)]
    assert u.completion_tokens == sum(lengths) == streamed["usage"].completion_tokens


def test_chat_n_samples_streamed_and_not(client):
    body = dict(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[1]}], n=2, seed=3, temperature=3.0,
                max_tokens=40)
    whole = client.chat.completions.create(**body)
    assert [c.index for c in whole.choices] == [0, 1]
    streamed = streamed_choices(client.chat.completions.create(**body, stream=True))
    assert [streamed[j]["text"] for j in range(2)] == [c.message.content for c in whole.choices]


def test_n_samples_compute_the_prompt_once(server, client):
    """n=8 on a fresh prompt: the first sample computes it; the other seven start once it has, take
    its full pages from the prefix cache and a copy of its partial last page, and compute only the
    last prompt token, whose logits they sample. usage and /metrics both show it."""
    prompt = QUESTIONS[2] + " Think twice."
    hits = 'splitreason_prefix_cache_hit_tokens_total{model="small"}'
    before = server.metric(hits)
    u = client.completions.create(model=MODEL, prompt=prompt, n=8, seed=1, max_tokens=8).usage
    computed = u.model_extra["prompt_tokens_computed"]
    assert computed == u.prompt_tokens + 7
    assert server.metric(hits) - before == 8 * u.prompt_tokens - computed


@pytest.mark.parametrize("mode", ["small", "split"])
def test_completion_logprobs_equal_the_library_streamed_and_not(client, library, mode):
    """Greedy: tokens, their logprobs and top-3 alternatives equal the engine's own; in split mode
    each token names the model that wrote it."""
    body = dict(model=MODEL, prompt=QUESTIONS[0], max_tokens=120, temperature=0, logprobs=3,
                extra_body={"mode": mode})
    whole = client.completions.create(**body)
    lp = whole.choices[0].logprobs
    [out] = library.generate([QUESTIONS[0]], SamplingParams(temperature=0, max_tokens=120, mode=mode, top_logprobs=3),
                             use_tqdm=False)
    assert len(lp.tokens) == len(out.token_ids)
    assert "".join(lp.tokens).startswith(whole.choices[0].text)  # and the end-of-sequence token, not in the text
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, out.logprobs)) <= TOL
    for top, expected in zip(lp.top_logprobs, out.top_logprobs):
        assert len(top) <= 3 and list(top.values()) == sorted(top.values(), reverse=True)
        assert abs(max(top.values()) - expected[0][1]) <= TOL
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    models = lp.model_extra["token_models"]
    assert models == [("small", "big")[m] for m in out.token_models]
    if mode == "split":
        assert "big" in models
    streamed = streamed_choices(client.completions.create(**body, stream=True))
    assert streamed[0]["tokens"] == lp.tokens
    assert max(abs(a - b) for a, b in zip(streamed[0]["logprobs"], lp.token_logprobs)) <= TOL


def test_chat_logprobs_with_top_alternatives(client):
    body = dict(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=40, temperature=0,
                logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**body)
    content = whole.choices[0].logprobs.content
    assert "".join(e.token for e in content).startswith(whole.choices[0].message.content)
    for e in content:
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) <= 1e-6  # greedy
        assert e.model_extra["model"] in ("small", "big")
    streamed = streamed_choices(client.chat.completions.create(**body, stream=True))
    assert streamed[0]["tokens"] == [e.token for e in content]
    plain = client.chat.completions.create(**{**body, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("mode", ["small", "big"])
def test_echo_scores_the_prompt_as_the_library_does(client, library, mode):
    """echo with max_tokens 0 and 1, streamed and not: the prompt's text, its tokens' logprobs
    (None first) equal to SamplingParams(prompt_logprobs=...)'s, then the completion's."""
    prompt = QUESTIONS[2]
    [ref] = library.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2, mode=mode), use_tqdm=False)
    for max_tokens in (0, 1):
        body = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=2, echo=True,
                    extra_body={"mode": mode})
        choice = client.completions.create(**body).choices[0]
        lp = choice.logprobs
        assert choice.text.startswith(prompt) and len(lp.tokens) == len(ref.prompt_token_ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        scores = lp.token_logprobs[1: len(ref.prompt_token_ids)]
        assert max(abs(a - b) for a, b in zip(scores, ref.prompt_logprobs[1:])) <= TOL
        for top, expected in zip(lp.top_logprobs[1:], ref.prompt_top_logprobs[1:]):
            assert abs(max(top.values()) - expected[0][1]) <= TOL
        streamed = streamed_choices(client.completions.create(**body, stream=True))
        assert streamed[0]["text"] == choice.text and streamed[0]["tokens"] == lp.tokens


def test_a_list_of_prompts_gives_their_choices_in_order(client):
    """Three prompts (text and token ids) times n=2: six choices, prompt-major, each the request
    made alone."""
    ids = [97, 51, 84, 65]
    prompts = [QUESTIONS[0], QUESTIONS[1]]
    body = dict(model=MODEL, max_tokens=20, temperature=0.8, seed=4, extra_body={"mode": "small"})
    whole = client.completions.create(prompt=prompts, n=2, **body)
    assert [c.index for c in whole.choices] == list(range(4))
    for i, prompt in enumerate(prompts):
        for j in range(2):
            alone = client.completions.create(prompt=prompt, **{**body, "seed": 4 + j})
            assert whole.choices[2 * i + j].text == alone.choices[0].text
    as_ids = client.completions.create(prompt=[ids, ids], **body)
    assert len(as_ids.choices) == 2 and as_ids.choices[0].text == as_ids.choices[1].text
    assert as_ids.usage.prompt_tokens == 2 * len(ids)
    streamed = streamed_choices(client.completions.create(prompt=prompts, n=2, stream=True, **body))
    assert [streamed[k]["text"] for k in range(4)] == [c.text for c in whole.choices]


def test_a_default_mode_serves_echo_to_clients_that_send_no_mode(library):
    """serve --default-mode big: a request naming no mode runs in big mode, so echo works without
    the mode field (lm-eval's loglikelihood body has none); a request may still name its own."""
    s = Server("--kv-cache-bytes", str(1 << 24), "--default-mode", "big")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        prompt = QUESTIONS[0]
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        assert whole.usage.model_extra["mode"] == "big"
        [ref] = library.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1, mode="big"), use_tqdm=False)
        got = whole.choices[0].logprobs.token_logprobs
        assert max(abs(a - b) for a, b in zip(got[1:], ref.prompt_logprobs[1:])) <= TOL
        split = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body={"mode": "split"})
        assert split.usage.model_extra["mode"] == "split"
    finally:
        s.close()
