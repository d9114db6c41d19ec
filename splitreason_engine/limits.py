"""What one HTTP request may ask for. The server checks these before any engine work and answers
400 (413 for the body) naming the field, so an oversized request costs the engine nothing."""

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: "int | None" = None  # None: the engine's max_model_len - 1
    max_completion_tokens: "int | None" = None  # None: the engine's max_model_len - 1
    max_stop_strings: int = 16
    max_stop_length: int = 256  # characters per stop string
    max_logit_bias: int = 1024  # entries
    max_messages: int = 256  # chat messages per request
    chat_template_timeout_s: float = 1.0  # longest a chat template may render
    max_n: int = 16  # samples per prompt (n)
    max_logprobs: int = 20  # alternatives per token (completions logprobs, chat top_logprobs)
    max_prompts: int = 64  # prompts in one completions request

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{f.name} must be positive, got {value!r}")

    def resolved(self, max_model_len: int) -> "ServerLimits":
        """These limits with the token limits that were left to the engine filled in."""
        context = max_model_len - 1
        return ServerLimits(**{**self.__dict__,
                               "max_prompt_tokens": min(self.max_prompt_tokens or context, context),
                               "max_completion_tokens": min(self.max_completion_tokens or context, context)})
