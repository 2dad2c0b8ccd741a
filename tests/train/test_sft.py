"""SFT: labels checked token by token against the rendered template; only the assistant's tokens count."""

from __future__ import annotations

import pytest

from tinylm.tiny import build_tokenizer
from tinylm.train import train
from tinylm.train.chat import pack_rows, sft_rows, tokenize_conversation
from tinylm.train.config import config_from_dict
from tinylm.train.data import IGNORE
from tinylm.train.metrics import read_log
from tinylm.train.shards import DataError


def _segments_chatml(messages):
    """The ChatML rendering written out by hand, as (text, is the assistant's) pieces."""
    pieces = []
    for m in messages:
        if m["role"] == "assistant":
            pieces += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>\n", True)]
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return pieces


def _expected(tokenizer, pieces):
    ids, labels = [], []
    for text, counted in pieces:
        part = tokenizer.encode(text, add_special_tokens=False)
        ids += part
        labels += part if counted else [IGNORE] * len(part)
    return ids, labels


@pytest.mark.parametrize("row", range(3))
def test_chatml_labels_token_by_token(h, row):
    tokenizer = build_tokenizer()
    messages = h.conversations()[row]["messages"]
    example = tokenize_conversation(tokenizer, messages)
    assert example["input_ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    ids, labels = _expected(tokenizer, _segments_chatml(messages))
    assert example["input_ids"] == ids
    assert example["labels"] == labels  # token by token: the role headers, system and user turns never count
    counted = [t for t in example["labels"] if t != IGNORE]
    answers = "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
    assert tokenizer.decode(counted, skip_special_tokens=False) == answers


def test_other_template_without_generation_prompt(h):
    """An [INST]-style template whose assistant turns are ' answer' + EOS: found by rendering, not by ChatML rules."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}")
    messages = h.conversations()[1]["messages"]  # Add 2 and 3. -> 5
    example = tokenize_conversation(tokenizer, messages)
    ids, labels = _expected(tokenizer, [("[INST] Add 2 and 3. [/INST]", False), (" 5<|endoftext|>", True)])
    assert example == {"input_ids": ids, "labels": labels}


def test_template_that_rewrites_history_is_one_line_error(tmp_path, h):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = h.write_jsonl(tmp_path / "chat.jsonl", h.conversations()[:1])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*prefix") as info:
        sft_rows(path, tokenizer, seq_len=256)
    assert "\n" not in str(info.value)


def test_bad_rows_name_the_line(tmp_path, h):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"text": "no messages here"}\n')
    with pytest.raises(DataError, match=r"chat\.jsonl:2: expected a `messages` list"):
        sft_rows(path, build_tokenizer(), seq_len=64)


def test_truncation_drops_rows_without_assistant_tokens(tmp_path, h):
    path = h.write_jsonl(tmp_path / "chat.jsonl", h.conversations())
    rows, dropped = sft_rows(path, build_tokenizer(), seq_len=12)  # too short to reach any answer
    assert rows == [] and dropped == 3


def test_packing_restarts_positions_and_never_predicts_across_examples(h):
    tokenizer = build_tokenizer()
    rows = [tokenize_conversation(tokenizer, c["messages"]) for c in h.conversations()]
    lengths = [len(r["input_ids"]) for r in rows]
    seq_len = lengths[1] + lengths[2] + 1
    packed = pack_rows(rows, seq_len)
    assert [len(p["input_ids"]) for p in packed] == [lengths[0], lengths[1] + lengths[2]]
    second = packed[1]
    assert second["position_ids"] == list(range(lengths[1])) + list(range(lengths[2]))
    assert second["input_ids"] == rows[1]["input_ids"] + rows[2]["input_ids"]
    assert second["labels"][lengths[1]] == IGNORE  # the first token of example 2 is not predicted from example 1
    assert second["labels"][:lengths[1]] == rows[1]["labels"]


def test_sft_run_with_packing_lowers_the_loss(tmp_path, h, tiny_folder):
    model = tiny_folder("qwen2", seed=0)
    data = h.write_jsonl(tmp_path / "chat.jsonl", h.conversations() * 8)
    config = config_from_dict({
        "mode": "sft", "model": {"path": str(model)},
        "data": {"train": [str(data)], "seq_len": 128, "packing": True, "eval_fraction": 0.1},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"max_steps": 16, "global_batch_size": 4, "micro_batch_size": 2, "precision": "fp32",
                  "progress": False, "threads": 1},
        "checkpoint": {"out_dir": str(tmp_path / "sft")},
    })
    result = train(config)
    assert result.losses[-1] < 0.5 * result.losses[0]
    log = read_log(config.out_dir / "log.jsonl")
    assert [r for r in log if r.get("event") == "checkpoint"][0]["eval_loss"] > 0
