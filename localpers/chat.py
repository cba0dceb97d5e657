"""Chat templates: the Jinja2 template stored in a GGUF (tokenizer.chat_template), rendered the way
llama.cpp and Hugging Face render it, so torch training and llama.cpp serving see the same prompt."""
from __future__ import annotations

from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used only for GGUFs without a template of their own.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """Render `messages` ([{"role", "content"}]) with a GGUF chat template into the prompt text."""
    return _compile(template or CHATML).render(
        messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
    )


def content_text(content) -> str:
    """The text of an OpenAI message `content`: a string, or a list of parts of which only text parts
    ({"type": "text", "text": str}) can be held by a text model; they are joined as they come.
    Raises UserError for anything else (an image part, a part without text)."""
    from localpers.errors import UserError

    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise UserError("content must be a string or a non-empty list of text parts")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise UserError(f'content[{i}] is not a text part ({{"type": "text", "text": ...}}; found {kind!r})')
    return "".join(part["text"] for part in content)
