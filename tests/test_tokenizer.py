"""Tokenizer and chat templates, held against transformers' own tokenizer on the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import minimoe
from minimoe import MinimoeError, load_tokenizer

from conftest import FIXTURES

BUNDLED = minimoe.default_model_path()
TEXTS = [
    "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n",
    "Unicode: héllo wörld, 日本語のテキスト, emoji 🐍🚀, math ∑∫√",
    "special tokens inline: <|im_start|>user\nhi<|im_end|>\n",
    "   leading spaces\t\ttabs\n\n\nand newlines   ",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What does `yield` do?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Explain MoE in one line."}],
    [{"role": "user", "content": "unicode ✓ and \"quotes\" and {braces}"}],
]

transformers = pytest.importorskip("transformers", reason="the reference tokenizer needs transformers")


def reference(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture
def qwen_style(tmp_path) -> Path:
    """The bundled tokenizer.json with Qwen1.5's own tokenizer_config.json and chat template."""
    shutil.copy(BUNDLED / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(FIXTURES / "qwen_chat" / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    return tmp_path


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "multi-turn", "quoting"])
def test_chat_template_matches_transformers_on_the_bundled_tokenizer(conversation, generation_prompt):
    ours = load_tokenizer(BUNDLED).apply_chat_template(conversation, add_generation_prompt=generation_prompt)
    theirs = reference(BUNDLED).apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours == theirs


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "multi-turn", "quoting"])
def test_chat_template_matches_transformers_on_a_qwen_tokenizer_config(qwen_style, conversation):
    ours = load_tokenizer(qwen_style).apply_chat_template(conversation, add_generation_prompt=True)
    theirs = reference(qwen_style).apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n") and ours.endswith("<|im_start|>assistant\n")


def test_template_helpers_render_as_in_transformers(qwen_style):
    """tojson (no HTML escaping), loop controls, special-token variables, trimmed blocks."""
    config = json.loads((qwen_style / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "  {{ m | tojson }}|{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ messages[0]['content'] | tojson(indent=2) }}{% endif %}"
    )
    (qwen_style / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "<b>&'x'</b> ü"}, {"role": "skip", "content": "no"}]
    ours = load_tokenizer(qwen_style).apply_chat_template(messages, add_generation_prompt=True)
    assert ours == reference(qwen_style).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<b>&'x'</b> ü" in ours and "skip" not in ours


def test_raise_exception_in_a_template_is_our_error(qwen_style):
    config = json.loads((qwen_style / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (qwen_style / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MinimoeError, match="chat template failed: roles must alternate"):
        load_tokenizer(qwen_style).apply_chat_template([{"role": "user", "content": "x"}])


def test_chatml_is_the_fallback_template(qwen_style):
    config = json.loads((qwen_style / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (qwen_style / "tokenizer_config.json").write_text(json.dumps(config))
    text = load_tokenizer(qwen_style).apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_and_round_trips(text):
    ours = load_tokenizer(BUNDLED)
    assert ours.encode(text) == reference(BUNDLED).encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


def test_special_tokens_are_single_ids_and_can_be_skipped():
    tok = load_tokenizer(BUNDLED)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_decode_never_splits_a_character(text):
    tok = load_tokenizer(BUNDLED)
    stream = tok.stream()
    pieces = [stream.push(token) for token in tok.encode(text)]
    assert "".join(pieces) + stream.flush() == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_vocab_and_merges_fallback_matches_transformers_qwen2_tokenizer(tmp_path):
    """A checkpoint with only vocab.json + merges.txt is tokenized as transformers' Qwen2Tokenizer does."""
    from tokenizers import Tokenizer as Backend

    Backend.from_file(str(BUNDLED / "tokenizer.json")).model.save(str(tmp_path))
    shutil.copy(FIXTURES / "qwen_chat" / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    ours = load_tokenizer(tmp_path)
    theirs = transformers.Qwen2Tokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text


def test_bad_tokenizer_folders(tmp_path):
    with pytest.raises(MinimoeError, match="no tokenizer.json, and no vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(MinimoeError, match="tokenizer.json: cannot be read"):
        load_tokenizer(tmp_path)
    with pytest.raises(MinimoeError, match="not a folder"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(MinimoeError, match="outside this tokenizer's vocabulary"):
        load_tokenizer(BUNDLED).decode([10**6])
