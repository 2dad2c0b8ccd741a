"""DPO data: TRL's preference format, `prompt` / `chosen` / `rejected`, as plain text or as message lists.

Tokenized as TRL's DPOTrainer does (trl/trainer/dpo_trainer.py `tokenize_row`, `maybe_apply_chat_template` in
trl/data_utils.py): a conversational prompt is rendered with the generation prompt, each completion is the text
the template adds for it after that prompt; prompt and completions are tokenized separately without special tokens,
and EOS is appended to each completion. Prompts keep their last `max_prompt_length` tokens; prompt + completion is
cut to `max_length` from the end (TRL's truncation_mode="keep_start").
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinylm.train.chat import read_jsonl
from tinylm.train.shards import DataError


def render_preference(tokenizer, row: dict) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text, applying the chat template to conversational rows."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return prompt, chosen, rejected
    if not all(isinstance(x, list) for x in (prompt, chosen, rejected)):
        raise DataError("prompt, chosen and rejected must all be strings or all be message lists")
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    completions = []
    for completion in (chosen, rejected):
        whole = tokenizer.apply_chat_template(prompt + completion, add_generation_prompt=False)
        if not whole.startswith(prompt_text):
            raise DataError("the chat template does not render the prompt as a prefix of prompt + completion")
        completions.append(whole[len(prompt_text):])
    return prompt_text, completions[0], completions[1]


def tokenize_preference(tokenizer, row: dict, max_prompt_length: int | None, max_length: int) -> dict:
    prompt, chosen, rejected = render_preference(tokenizer, row)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("DPO needs a tokenizer with an eos_token (appended to each completion, as TRL does)")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    out = {"prompt_ids": prompt_ids}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        ids = tokenizer.encode(text, add_special_tokens=False) + [eos]
        out[f"{name}_ids"] = ids[:max(0, max_length - len(prompt_ids))]
    return out


def preference_rows(path: str | Path, tokenizer, max_prompt_length: int | None, max_length: int) -> list[dict]:
    rows = []
    for number, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
            raise DataError(f"{Path(path).name}:{number}: expected prompt, chosen and rejected")
        try:
            example = tokenize_preference(tokenizer, row, max_prompt_length, max_length)
        except DataError as exc:
            raise DataError(f"{Path(path).name}:{number}: {exc}") from None
        if not example["chosen_ids"] or not example["rejected_ids"]:
            raise DataError(f"{Path(path).name}:{number}: the prompt fills data.seq_len; no completion token is left")
        rows.append(example)
    return rows


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, in one right-padded batch (as TRL's concatenated_forward).

    -> input_ids (2B, T), attention_mask (2B, T), completion_mask (2B, T): 1 on completion tokens.
    """
    sequences = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    length = max(len(p) + len(c) for p, c in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (prompt, answer) in enumerate(sequences):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        mask[i, :n] = 1
        completion[i, len(prompt):n] = 1
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
