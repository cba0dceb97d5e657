"""Tokenization through llama.cpp's own tokenizer (a vocab-only llama_cpp.Llama), so that the torch model and
llama.cpp serving see exactly the same token ids; chat prompts are rendered with the GGUF's template."""
from __future__ import annotations

import ctypes

from localpers.model.chat import ChatTokens, chat_tokens, render_chat
from localpers.model.gguf_info import open_gguf


class Tokenizer:
    def __init__(self, llama, chat_template: str | None):
        self.llama = llama
        self.chat_template = chat_template
        self.bos_id = llama.token_bos()
        self.eos_id = llama.token_eos()
        self.bos_token = self._token_text(self.bos_id)
        self.eos_token = self._token_text(self.eos_id)
        self.add_bos = llama._model.add_bos_token()

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        import llama_cpp

        open_gguf(path, check_arch=False)  # a one-line UserError for a missing or broken file
        from localpers.engine.engine import closed_at_exit, install_llama_log

        install_llama_log()  # llama.cpp's log stays out unless --verbose
        llama = closed_at_exit(llama_cpp.Llama(str(path), vocab_only=True, verbose=False))
        return cls(llama, llama.metadata.get("tokenizer.chat_template"))

    def _token_text(self, token_id: int) -> str:
        return "" if token_id < 0 else self.llama._model.token_get_text(token_id)

    def __len__(self) -> int:
        return self.llama.n_vocab()

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`; add_bos=None follows the model (tokenizer.ggml.add_bos_token); special=True
        parses special-token text such as '<|im_start|>' into their ids, as chat prompts need."""
        add_bos = self.add_bos if add_bos is None else add_bos
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def decode(self, ids, special: bool = True) -> str:
        """Text of token ids; special=True writes special tokens as their text, so decode(encode(s)) == s.
        llama.cpp's own detokenizer, which (unlike joining pieces) drops SentencePiece's leading space."""
        import llama_cpp

        ids = list(ids)
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        size = 16 + 8 * len(ids)
        for _ in range(2):  # a negative result is the size needed
            text = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(self.llama._model.vocab, tokens, len(ids), text, size, False, special)
            if n >= 0:
                return text.raw[:n].decode("utf-8", errors="replace")
            size = -n
        raise RuntimeError(f"llama_detokenize failed ({n})")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.chat_template, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                           add_generation_prompt=add_generation_prompt)

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> ChatTokens:
        """The conversation's token ids exactly as the served path makes them (localpers.model.chat.chat_tokens: message
        text is never parsed into special tokens), with where each message's content ends."""
        return chat_tokens(self.llama, self.chat_template, messages, bos_token=self.bos_token,
                           eos_token=self.eos_token, add_generation_prompt=add_generation_prompt)
