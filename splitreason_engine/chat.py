"""Rendering chat messages into a prompt: the checkpoint's chat template when it has one, else the
DeepSeek-R1 markers (the SplitReason models' format)."""

import json
import sys
import time
from pathlib import Path

from jinja2 import TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def load_chat_template(folder: Path) -> "str | None":
    cfg = Path(folder) / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    template = json.loads(cfg.read_text()).get("chat_template")
    return template if isinstance(template, str) else None


def check_messages(messages, max_messages: int) -> list[dict]:
    """Raises ValueError naming the problem unless `messages` is a non-empty list of at most
    `max_messages` {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    if len(messages) > max_messages:
        raise ValueError(f"messages has {len(messages)} entries; this server takes at most {max_messages}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] needs a role of system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
    return messages


class TemplateError(ValueError):
    """A chat template failed, broke the sandbox's rules or ran out of time, for these messages."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with `*` and `**` refused where they would build huge values
    (its `range` is already capped)."""

    intercepted_binops = frozenset({"*", "**"})
    MAX_REPEAT = 1 << 16

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise SecurityError(f"chat template: exponent {right} is too large")
        if operator == "*":
            count, seq = (right, left) if isinstance(right, int) else (left, right)
            if isinstance(count, int) and isinstance(seq, (str, list, tuple)) and count * len(seq) > self.MAX_REPEAT:
                raise SecurityError(f"chat template: repeating a sequence {count} times is too large")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str):
    raise TemplateError(f"the chat template refused the messages: {message}")


class ChatTemplate:
    """A checkpoint's chat template, compiled once, rendered in Jinja's sandbox within a time bound
    (a template that loops cannot hold a server thread)."""

    def __init__(self, source: str, timeout_s: float = 1.0):
        self.timeout_s = timeout_s
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception  # Hugging Face templates call it on bad input
        try:
            self.template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not compile: {e}") from None

    def render(self, messages: list[dict], bos: str = "", eos: str = "") -> str:
        deadline = time.monotonic() + self.timeout_s

        def tracer(frame, event, arg):  # runs on each line of the compiled template's Python
            if time.monotonic() > deadline:
                raise TemplateError(f"the chat template took longer than {self.timeout_s} s to render")
            return tracer

        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        except TemplateError:
            raise
        except Exception as e:  # the template's own errors, and the sandbox's
            raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(previous)


def render(messages: list[dict], template: "ChatTemplate | None") -> str:
    """A prompt that ends where the assistant's reply begins."""
    if template is not None:
        return template.render(messages)
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    turns = "".join(f"<｜User｜>{m['content']}" if m["role"] == "user" else f"<｜Assistant｜>{m['content']}<｜end▁of▁sentence｜>"
                    for m in messages if m["role"] != "system")
    return f"<｜begin▁of▁sentence｜>{system}{turns}<｜Assistant｜>"


def question(messages: list[dict]) -> str:
    """Split and random modes put the question into the SplitReason template themselves: the
    system and user turns, each without its surrounding whitespace, joined."""
    return "\n\n".join(m["content"].strip() for m in messages if m["role"] in ("system", "user"))
