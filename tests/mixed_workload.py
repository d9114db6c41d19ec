"""A mixed serving workload for the compile-coverage tests (tests/test_warmup.py on the CPU,
tests/test_gpu_compiles.py on CUDA): waves of 1 to 64 requests over the four modes, prompts of
many lengths, every sampling option and stop-id widths up to 40."""

from splitreason_engine import Engine, SamplingParams

QUESTIONS = ["2+2?", "Name a prime.", "x", "Why is the sky blue? Think step by step, then answer briefly.",
             "Sum 17 and 25", "a b c d e f g h i j k l m n o p", "Is 91 prime?", "Count to five",
             "What is the capital of France, and why is it that city rather than another one?"]
WAVES = (1, 2, 3, 5, 8, 13, 17, 31, 64)
KINDS = [dict(temperature=0), dict(temperature=0.9), dict(temperature=0.8, top_k=7),
         dict(temperature=0.8, top_p=0.85), dict(temperature=1.1, top_k=30, top_p=0.7, logprobs=True)]


def mixed_workload(engine: Engine, split_bias: dict[int, float], bias: "dict[int, float] | None" = None,
                   waves=WAVES, max_prompt: int = 150) -> list:
    """Runs the waves to completion and returns every output. `split_bias` (on the tag tokens)
    goes to split-mode requests, to make handoffs frequent; `bias` to every request."""
    vocab = min(engine.real_vocab)
    bias = bias or {}
    outs = []
    for wave, size in enumerate(waves):
        prompts, params = [], []
        for i in range(size):
            # The templated split / random prompts are long (a character-level template): a few per wave.
            mode = ("split", "random", "small", "big")[(wave + i) % 4] if i < 4 else ("small", "big")[i % 2]
            stop_width = (0, 1, 2, 5, 17, 40)[(wave * 7 + i) % 6]
            logit_bias = {**bias, **split_bias} if mode == "split" else dict(bias)
            params.append(SamplingParams(max_tokens=4 + (wave * 5 + i * 3) % 21, mode=mode, seed=wave * 100 + i,
                                         stop_token_ids=[vocab - 1 - k for k in range(stop_width)],
                                         logit_bias=logit_bias, switch_ratio=1.0, switch_chunk=3,
                                         max_offload_tokens=6, **KINDS[(wave + 2 * i) % len(KINDS)]))
            if mode in ("split", "random"):
                prompts.append(QUESTIONS[(wave + i) % len(QUESTIONS)])
            else:
                length = 1 + (wave * 37 + i * 11) % max_prompt
                prompts.append([(7 * k + i) % vocab for k in range(length)])
        outs += engine.generate(prompts, params, use_tqdm=False)
    return outs
