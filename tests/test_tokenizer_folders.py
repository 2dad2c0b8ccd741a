"""tinylm.tokenizer folders: a missing or broken tokenizer.json, and Tokenizer.save writing folders that
transformers' AutoTokenizer loads to the same ids, chat templates and special tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as Backend

from tests.tokenizer_helpers import CHAT_CASES, FAMILIES, QWEN25_TEMPLATE, SMOLLM2_TEMPLATE, TEXTS
from tinylm.errors import TemplateError
from tinylm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


# --- folders

def test_missing_or_broken_tokenizer_json_raises_template_error(tmp_path):
    with pytest.raises(TemplateError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TemplateError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_loads_in_transformers(pairs, family, tmp_path):
    ours, _ = pairs[family]
    ours.save(tmp_path)
    theirs, again = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), Tokenizer.from_folder(tmp_path)
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text) == again.encode(text), text
    for messages, tools, variables in [(m, t, v) for f, m, t, v in CHAT_CASES if f == family]:
        args = dict(add_generation_prompt=True, tools=tools, **variables)
        text = ours.apply_chat_template(messages, **args)
        assert theirs.apply_chat_template(messages, tokenize=False, **args) == text
        assert theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **args) == \
            again.apply_chat_template(messages, tokenize=True, **args)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (ours.bos_token, ours.eos_token, ours.pad_token)


def test_save_writes_named_templates(tmp_path, trained):
    tok = Tokenizer(Backend.from_str(trained["byte_level"]), eos_token="<|im_end|>",
                    chat_template={"default": SMOLLM2_TEMPLATE, "tool_use": QWEN25_TEMPLATE})
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.chat_template == {"default": SMOLLM2_TEMPLATE, "tool_use": QWEN25_TEMPLATE}
    assert Tokenizer.from_folder(tmp_path).templates == tok.templates
