"""Tokenizers and chat templates, as transformers renders them.

:func:`load_tokenizer` reads a checkpoint folder's ``tokenizer.json`` with the
``tokenizers`` library (falling back to ``vocab.json`` + ``merges.txt``, built the
way transformers builds a Qwen2 tokenizer), and ``tokenizer_config.json`` for the
special tokens and the ``chat_template``.  Chat templates are Jinja2 programs from
the checkpoint; they are rendered in a sandbox with the same settings, filters and
globals as transformers' ``apply_chat_template``, so the prompt the model sees is
character for character the one transformers would build.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from .config import read_json_object
from .errors import MinimoeError

# Qwen's ChatML, used when a checkpoint ships no chat template (Qwen1.5's own template).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The pre-tokenizer split of transformers' Qwen2Tokenizer, for checkpoints with only vocab.json + merges.txt.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The named special tokens transformers passes to every chat template.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template."""

    def __init__(self, backend, config: dict[str, Any], source: Path):
        self.backend = backend  # a tokenizers.Tokenizer
        self.config = config
        self.source = source
        self.special_tokens = {name: _token_text(config.get(name)) for name in NAMED_SPECIAL_TOKENS
                               if _token_text(config.get(name)) is not None}
        self.chat_template = config.get("chat_template") or CHATML_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) become their ids."""
        if not isinstance(text, str):
            raise MinimoeError(f"encode expects a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(self._checked(ids), skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids: Iterable[int]) -> list[str]:
        """Each token's own text, ids ``[T]`` -> ``T`` strings (a trace's ``tokens``; a piece of a multi-byte
        character decodes to U+FFFD on its own)."""
        return self.backend.decode_batch([[i] for i in self._checked(ids)], skip_special_tokens=False)

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise MinimoeError(f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return ids

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A decoder that takes ids one at a time and yields text as soon as it is complete."""
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render ``messages`` ([{"role", "content"}, ...]) with the checkpoint's chat template.

        Same environment as transformers: a sandbox with ``trim_blocks``/``lstrip_blocks``,
        ``tojson``, ``raise_exception``, ``strftime_now``, and the named special tokens
        (``bos_token``, ``eos_token``, ...) as variables.  ``tokenize=True`` returns ids.
        """
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise MinimoeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        try:
            text = _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise MinimoeError(f"{self.source}: chat template failed: {exc}") from None
        return self.encode(text) if tokenize else text


class StreamDecoder:
    """Incremental decoding that never cuts a multi-byte character in half.

    Byte-level BPE splits one UTF-8 character over several tokens; decoding them one
    by one would print replacement characters.  We keep a short window of recent ids
    and only release text once it no longer ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids before this are fully emitted and no longer needed as context
        self.read = 0  # ids before this have had their text emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became complete (possibly "")."""
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix : self.read], self.skip)
        current = decode(self.ids[self.prefix :], self.skip)
        if len(current) > len(emitted) and not current.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return current[len(emitted):]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character at the very end shows as U+FFFD)."""
        emitted = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip)
        rest = self.tokenizer.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return rest[len(emitted):]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``)."""
    from tokenizers import Tokenizer as Backend

    folder = Path(path)
    if not folder.is_dir():
        raise MinimoeError(f"{folder}: not a folder (expected a checkpoint folder with tokenizer files)")
    config = read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    if (folder / "tokenizer.json").exists():
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the tokenizers library raises plain Exceptions on bad files
            raise MinimoeError(f"{folder / 'tokenizer.json'}: cannot be read ({exc})") from None
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        backend = _from_vocab_and_merges(folder, config)
    else:
        raise MinimoeError(f"{folder}: no tokenizer.json, and no vocab.json + merges.txt")
    return Tokenizer(backend, config, folder)


def _from_vocab_and_merges(folder: Path, config: dict[str, Any]):
    """A byte-level BPE built as transformers builds Qwen2Tokenizer from the same two files."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    try:
        model = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    except Exception as exc:
        raise MinimoeError(f"{folder}: vocab.json/merges.txt cannot be read ({exc})") from None
    backend = Backend(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = [_token_text(entry) for entry in config.get("added_tokens_decoder", {}).values()]
    specials += [_token_text(config.get(name)) for name in NAMED_SPECIAL_TOKENS]
    specials += [_token_text(t) for t in config.get("additional_special_tokens") or []]
    unique = list(dict.fromkeys(t for t in specials if t))
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in unique])
    return backend


def _token_text(entry: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


@lru_cache(maxsize=8)
def _compile(template: str):
    """Compile a chat template in the environment transformers uses (sandboxed, same helpers)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides Jinja's tojson, which would HTML-escape the output
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise MinimoeError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from None
