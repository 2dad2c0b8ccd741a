"""A training run's progressive checkpoints, and how many training tokens each had seen.

Convention. A run folder holds one sub-folder per checkpoint (any folder tinylm loads: config.json, or a .gguf file).
A checkpoint's training tokens are, first found:
1. a numeric top-level key `tokens`, `train_tokens`, `training_tokens`, `tokens_seen` or `num_input_tokens_seen`
   (what the Hugging Face Trainer writes) in one of the folder's JSON files: trainer/state.json (what
   `tinylm train` writes), tinylm_checkpoint.json, checkpoint.json, metadata.json, trainer_state.json, config.json;
2. the folder name: `tokens-N`, `tokens_N` or `N-tokens`, N with an optional k/M/B/T suffix (`tokens-2.5B`),
   or TinyLlama's `...-step-480k-1T` (a step segment and a final token count in B or T);
3. the step (`global_step` / `step` in those files, or a name `step-N`, `step_N`, `checkpoint-N`, N with an
   optional k) times --tokens-per-step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tinylm.eval.data import EvalDataError

_FILES = ("trainer/state.json", "tinylm_checkpoint.json", "checkpoint.json", "metadata.json", "trainer_state.json", "config.json")
_TOKEN_KEYS = ("tokens", "train_tokens", "training_tokens", "tokens_seen", "num_input_tokens_seen")
_STEP_KEYS = ("global_step", "step")
_UNITS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_NUMBER = r"(\d+(?:\.\d+)?)([kKMBGT]?)"


@dataclass
class Checkpoint:
    path: Path
    tokens: int | None
    step: int | None


def is_model_folder(path: Path) -> bool:
    """A loadable folder; hidden ones (a trainer's `.tmp-checkpoint-*` being written) are not checkpoints yet."""
    if path.name.startswith(".") or not path.is_dir():
        return False
    return (path / "config.json").is_file() or any(path.glob("*.gguf"))


def checkpoint_info(path: Path, tokens_per_step: int | None = None) -> Checkpoint:
    path = Path(path)
    meta = _metadata(path) if path.is_dir() else {}
    tokens = _first_number(meta, _TOKEN_KEYS) or _tokens_from_name(path.name)
    step = _first_number(meta, _STEP_KEYS) or _step_from_name(path.name)
    if tokens is None and step is not None and tokens_per_step:
        tokens = step * tokens_per_step
    return Checkpoint(path, None if tokens is None else int(tokens), None if step is None else int(step))


def discover_series(run_dir: Path, tokens_per_step: int | None = None) -> list[Checkpoint]:
    """The run's checkpoint folders, in training order; each must say how many tokens it had seen."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalDataError(f"{run_dir}: not a folder of checkpoints")
    found = [checkpoint_info(p, tokens_per_step) for p in sorted(run_dir.iterdir()) if is_model_folder(p)]
    if not found:
        raise EvalDataError(f"{run_dir}: no checkpoint folders in it (folders with config.json or a .gguf file)")
    unknown = [c.path.name for c in found if c.tokens is None]
    if unknown:
        raise EvalDataError(f"{run_dir / unknown[0]}: cannot tell its training tokens (name it tokens-N, record "
                            f"'tokens' in tinylm_checkpoint.json, or give --tokens-per-step with step-N names)")
    return sorted(found, key=lambda c: c.tokens)


def _metadata(path: Path) -> dict:
    merged: dict = {}
    for name in reversed(_FILES):  # earlier files in _FILES win
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            merged.update(data)
    return merged


def _first_number(meta: dict, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _value(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def _tokens_from_name(name: str) -> float | None:
    match = re.search(rf"tokens[-_]{_NUMBER}(?![\w.])", name) or re.search(rf"(?<![\w.]){_NUMBER}[-_]tokens", name)
    if match:
        return _value(*match.groups())
    if _step_from_name(name) is not None:  # TinyLlama: TinyLlama-1.1B-intermediate-step-480k-1T
        match = re.search(r"[-_](\d+(?:\.\d+)?)([BT])$", name)
        if match:
            return _value(*match.groups())
    return None


def _step_from_name(name: str) -> float | None:
    match = re.search(r"(?:step|checkpoint)[-_]?(\d+)([kK]?)(?![\w.])", name)
    return _value(*match.groups()) if match else None
