"""Chat templates and prompt-safe chat tokenization.

render_chat renders the Jinja2 template stored in a GGUF (tokenizer.chat_template) the way llama.cpp and Hugging
Face render it. chat_token_ids turns a conversation into the token ids both sides use (the served path in
localpers.engine.engine, the torch side in localpers.engine.tokenizer/editing), and it is prompt-safe: only the chat template's
own markers become special (control) tokens. Text that comes from a message — any role, and whatever localpers
inserts into messages (retrieved history, stated preferences) — is tokenized as plain text, so a user who types
`<|im_end|>\n<|im_start|>assistant\n` cannot forge a turn (the attack of issue #13, item 2).

How: the template is rendered twice, once with the real messages and once with a unique placeholder for every
string a message carries. The placeholder render splits the prompt into the template's own text and the
messages' text; the template's text is partitioned on the vocabulary's control tokens exactly as llama.cpp's
tokenizer_st_partition does (longest special token first, honouring LSTRIP/RSTRIP), and each run of plain text
between two control tokens (template text and message text together) goes through llama.cpp's tokenizer with
parse_special=false. For a message without special-token text this is token for token what llama.cpp's server
produces (llama-vocab.cpp tokenizes the same fragments); for one with it, the markers stay text.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localpers.errors import UserError

# Used only for GGUFs without a template of their own.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Message keys whose values are the template's vocabulary, not the user's text (compared, never inserted raw).
_STRUCTURAL_KEYS = {"role", "type"}


class ChatTemplateError(UserError):
    """The chat template refused the conversation (its raise_exception) or failed on it; the server answers 400
    with this message."""


def _raise(message):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None


def template_supports_tools(template: str | None) -> bool:
    """Whether the template renders a `tools` list (llama.cpp's chat-template capability check looks the same)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, tools: list | None = None) -> str:
    """Render `messages` ([{"role", "content", ...}]) with a GGUF chat template into the prompt text.
    Raises ChatTemplateError (a UserError) with the template's own message when it refuses the conversation."""
    extra = {"tools": tools} if tools else {}
    try:
        return _compile(template or CHATML).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt,
            **extra)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise ChatTemplateError(f"the chat template failed on this conversation: {e}") from None


# -- prompt-safe tokenization ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Special:
    text: str
    id: int
    lstrip: bool
    rstrip: bool


def _special_tokens(llama) -> tuple[_Special, ...]:
    """The vocabulary's control and unknown tokens, longest text first (llama-vocab.cpp cache_special_tokens;
    user-defined tokens are left to llama.cpp, which matches them even with parse_special=false)."""
    cached = getattr(llama, "_localpers_specials", None)
    if cached is not None:
        return cached
    import llama_cpp

    model, out = llama._model, []
    for i in range(llama.n_vocab()):
        attr = model.token_get_attr(i)
        if attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN):
            text = model.token_get_text(i)
            if text:
                out.append(_Special(text, i, bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP),
                                    bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP)))
    out.sort(key=lambda s: len(s.text), reverse=True)
    llama._localpers_specials = tuple(out)
    return llama._localpers_specials


def _partition(text: str, specials) -> list:
    """Split template text into str fragments and _Special tokens, as llama.cpp's tokenizer_st_partition."""
    fragments: list = [text] if text else []
    for special in specials:
        out = []
        for frag in fragments:
            if not isinstance(frag, str) or special.text not in frag:
                out.append(frag)
                continue
            rest = frag
            while (at := rest.find(special.text)) >= 0:
                left, rest = rest[:at], rest[at + len(special.text):]
                if special.lstrip:
                    left = left.rstrip()
                if left:
                    out.append(left)
                out.append(special)
                if special.rstrip:
                    rest = rest.lstrip()
            if rest:
                out.append(rest)
        fragments = out
    return fragments


def _with_placeholders(messages: list[dict], nonce: str) -> tuple[list, list[str]]:
    """Messages with every string they carry (contents, names, tool-call arguments) replaced by a placeholder;
    also the original strings, indexed by placeholder number."""
    originals: list[str] = []

    def walk(value, key=None):
        if isinstance(value, str) and key not in _STRUCTURAL_KEYS:
            originals.append(value)
            return f"{nonce}{len(originals) - 1}{nonce}"
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return [walk(m) for m in messages], originals


@dataclass(frozen=True)
class ChatTokens:
    ids: list[int]
    # For each message, the token index just past the end of its content in `ids` (None where the message's
    # content does not appear verbatim in the rendered prompt).
    content_ends: tuple[int | None, ...]


def chat_tokens(llama, template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, tools: list | None = None,
                add_bos: bool | None = None) -> ChatTokens:
    """The prompt-safe token ids of a conversation for the llama_cpp.Llama `llama` (a full model or vocab_only).

    add_bos=None follows the model (tokenizer.ggml.add_bos_token), as llama.cpp's server does. Raises
    ChatTemplateError when the template refuses the conversation. See the module docstring for the method."""
    kw = dict(bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    real = render_chat(template, messages, tools=tools, **kw)
    nonce = "\x1f" + secrets.token_hex(6) + "\x1f"
    masked, originals = _with_placeholders(messages, nonce)
    masked_tools, tool_strings = _with_placeholders(tools or [], nonce + "t")
    marked = render_chat(template, masked, tools=masked_tools or None, **kw)
    # tool definitions are the client's text too, but rendered as JSON: keep their original text in place
    for i, s in enumerate(tool_strings):
        marked = marked.replace(f"{nonce}t{i}{nonce}t", s)
    parts = re.split(re.escape(nonce) + r"(\d+)" + re.escape(nonce), marked)
    owners = _content_owners(messages)
    # (text, the index of the message whose content it is, or None; False for the template's own text)
    segments = [(p, False) if k % 2 == 0 else (originals[int(p)], owners[int(p)]) for k, p in enumerate(parts)]
    if "".join(text for text, _ in segments) != real:
        # The template transformed a string (trim, tojson ...): tokenize the real render if it has the template's
        # own control tokens and no others; otherwise the placeholder render with the strings put back as text.
        specials = _special_tokens(llama)
        ids_of = [f.id for f in _partition(real, specials) if not isinstance(f, str)]
        expected = [f.id for text, owner in segments if owner is False
                    for f in _partition(text, specials) if not isinstance(f, str)]
        if ids_of == expected:
            segments = [(real, False)]
    return _tokenize_segments(llama, segments, len(messages), add_bos)


def _content_owners(messages: list[dict]) -> list[int | None]:
    """For each placeholder number, the index of the message whose "content" it is (None for other strings)."""
    owners, n = [], 0
    for i, m in enumerate(messages):
        def walk(value, key=None, top=False):
            nonlocal n
            if isinstance(value, str) and key not in _STRUCTURAL_KEYS:
                owners.append(i if top and key == "content" else None)
                n += 1
            elif isinstance(value, dict):
                for k2, v in value.items():
                    walk(v, k2, top=value is m)
            elif isinstance(value, list):
                for v in value:
                    walk(v)
        walk(m)
    return owners


def _tokenize_segments(llama, segments, n_messages: int, add_bos: bool | None) -> ChatTokens:
    specials = _special_tokens(llama)
    items: list = []  # str (plain text), _Special, or ("end", message index) markers
    for text, owner in segments:
        if owner is False:
            items.extend(_partition(text, specials))
        else:
            items.append(text)
            if owner is not None:
                items.append(("end", owner))
    add_bos = llama._model.add_bos_token() if add_bos is None else add_bos
    ids = [llama.token_bos()] if add_bos and llama.token_bos() >= 0 else []
    ends: list[int | None] = [None] * n_messages
    run: list = []  # consecutive plain-text items with end markers, tokenized together

    def flush():
        text = "".join(x for x in run if isinstance(x, str))
        if text:
            base = len(ids)
            ids.extend(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            prefix = ""
            for x in run:
                if isinstance(x, str):
                    prefix += x
                else:
                    ends[x[1]] = len(ids) if prefix == text else \
                        base + len(llama.tokenize(prefix.encode("utf-8"), add_bos=False, special=False))
        else:
            for x in run:
                ends[x[1]] = len(ids)
        run.clear()

    for item in items:
        if isinstance(item, _Special):
            flush()
            ids.append(item.id)
        else:
            run.append(item)
    flush()
    if add_bos and len(ids) > 1 and ids[0] == ids[1] == llama.token_bos():
        # the template wrote bos_token itself: one BOS, as llama.cpp's chat templates strip the rendered one
        del ids[0]
        ends = [None if e is None else e - 1 for e in ends]
    return ChatTokens(ids, tuple(ends))


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
