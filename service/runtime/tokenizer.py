"""The bundle's tokenizer: `tokenizers` for text, jinja2 for the chat template."""
from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, tokenizer_file: str | Path, config: dict):
        self._tok = _HFTokenizer.from_file(str(tokenizer_file))
        self.config = config
        self.bos_token_id: int | None = config.get("bos_token_id")
        self.eos_token_ids: list[int] = list(config.get("eos_token_ids") or [])
        self.pad_token_id: int | None = config.get("pad_token_id")
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.image_token: str | None = config.get("image_token")
        self.image_token_id: int | None = config.get("image_token_id")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        template = config.get("chat_template") or ""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template) if template else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of `text`; add_bos=False for text that continues a prompt (no BOS in the middle)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (add_bos and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this bundle has no chat template")
        for m in messages:
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message needs 'role' and 'content': {m!r}")
        def token(i):
            return self._tok.id_to_token(i) if i is not None else ""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=token(self.bos_token_id),
                                     eos_token=token(self.eos_token_ids[0] if self.eos_token_ids else None))


def _raise(message: str):
    raise ValueError(f"chat template: {message}")
