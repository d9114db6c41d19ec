"""Rendering chat messages into a prompt: the checkpoint's chat template when it has one, else the
DeepSeek-R1 markers (the SplitReason models' format)."""

import json
from pathlib import Path


def load_chat_template(folder: Path) -> "str | None":
    cfg = Path(folder) / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    template = json.loads(cfg.read_text()).get("chat_template")
    return template if isinstance(template, str) else None


def check_messages(messages) -> list[dict]:
    """Raises ValueError naming the problem unless `messages` is a non-empty list of
    {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] needs a role of system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
    return messages


def render(messages: list[dict], template: "str | None", bos: str = "", eos: str = "") -> str:
    """A prompt that ends where the assistant's reply begins."""
    if template is not None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                                eos_token=eos)
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    turns = "".join(f"<｜User｜>{m['content']}" if m["role"] == "user" else f"<｜Assistant｜>{m['content']}<｜end▁of▁sentence｜>"
                    for m in messages if m["role"] != "system")
    return f"<｜begin▁of▁sentence｜>{system}{turns}<｜Assistant｜>"


def question(messages: list[dict]) -> str:
    """Split and random modes put the question into the SplitReason template themselves: the
    system and user turns, joined."""
    return "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "user"))
