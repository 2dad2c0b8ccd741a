"""SFT data: conversations in TRL's `messages` format, rendered with the model's chat template, loss on the
assistant's tokens only.

The assistant's tokens are found by rendering the template itself, so any template works: for the assistant
message i, the text of messages[:i] with the generation prompt and the text of messages[:i+1] are both prefixes of
the whole conversation; the characters between them are the assistant's turn (its content and the end-of-turn
markup the template writes after it, but not the role header). A token counts when it starts inside such a span.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinylm.errors import TemplateError
from tinylm.train.data import IGNORE
from tinylm.train.shards import DataError


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a .jsonl file (or a .json file holding a list of rows)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise DataError(f"{path.name}: a .json data file must hold a list of rows")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name}:{number}: not valid JSON ({exc.msg})") from None
    return rows


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) character spans of each assistant turn])."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise DataError("a conversation cannot start with an assistant message (no prompt to render)")
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(after) and after.startswith(before)):
            raise DataError(f"the chat template does not render the conversation up to message {i} as a prefix "
                            "of the whole conversation, so the assistant's tokens cannot be located")
        spans.append((len(before), len(after)))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict]) -> dict:
    """-> {"input_ids": [...], "labels": [...]} with labels = IGNORE outside the assistant's turns."""
    full, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)  # the template writes BOS itself
    labels = [tok if any(a <= start < b for a, b in spans) else IGNORE
              for tok, (start, _) in zip(encoding.ids, encoding.offsets)]
    return {"input_ids": list(encoding.ids), "labels": labels}


def sft_rows(path: str | Path, tokenizer, seq_len: int) -> tuple[list[dict], int]:
    """Tokenized rows of an SFT file, cut to seq_len; rows left with no assistant token are dropped (counted)."""
    rows, dropped = [], 0
    for number, row in enumerate(read_jsonl(path), 1):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not _is_conversation(messages):
            raise DataError(f"{Path(path).name}:{number}: expected a `messages` list of {{role, content}} objects")
        try:
            example = tokenize_conversation(tokenizer, messages)
        except (DataError, TemplateError) as exc:
            raise DataError(f"{Path(path).name}:{number}: {exc}") from None
        example = {k: v[:seq_len] for k, v in example.items()}
        if all(label == IGNORE for label in example["labels"][1:]):
            dropped += 1
            continue
        rows.append(example)
    return rows, dropped


def _is_conversation(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)


def pack_rows(rows: list[dict], seq_len: int) -> list[dict]:
    """Concatenate examples, in order, into rows of at most seq_len tokens (an example never straddles two rows).

    Positions restart at 0 for each example, so RoPE sees each conversation as it would alone and the model's
    forward, finding the restarts, lets each token attend only within its own example (block-diagonal causal mask,
    tinylm.model.transformer.packed_segments, as transformers does with packed position_ids); the first token of
    each example gets no label, so no loss is ever taken on predicting one example from another.
    """
    packed, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        n = len(row["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > seq_len:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += row["input_ids"]
        current["labels"] += [IGNORE] + row["labels"][1:]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packed.append(current)
    return packed
