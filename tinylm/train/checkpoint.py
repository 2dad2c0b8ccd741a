"""Atomic checkpoints: written to a temporary folder beside the final one, then renamed into place.

A checkpoint folder is a Hugging Face model folder (config.json, model.safetensors, tokenizer files,
generation_config.json, SHA256SUMS) plus `train_config.yaml`, `adapter/` under LoRA, and `trainer/` with what a
resume needs: `state.json` (step, tokens, data position, losses, RNG states of every process), and the optimizer as
`optimizer.safetensors` (its tensors) + `optimizer.json` (the rest). Nothing is pickled. `trainer/state.json` is
written last: only a folder that has it and carries a final name counts as a checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tinylm.errors import TinyLMError

_NAME = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"


class CheckpointError(TinyLMError, ValueError):
    """A checkpoint that cannot be resumed from."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders and folders without trainer/state.json are skipped)."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
             and (p / "trainer" / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def remove_temporaries(out_dir: Path) -> list[Path]:
    """Folders left by a writer that died before its rename: never complete, safe to delete."""
    stale = [p for p in out_dir.glob(TMP_PREFIX + "*")] if out_dir.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_atomically(out_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a fresh temporary folder in out_dir, flush it to disk, rename it to its final name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / checkpoint_name(step)
    tmp = out_dir / f"{TMP_PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    _before_rename(tmp)
    if final.exists():  # the same step saved again (e.g. a resumed run that stops where it started)
        old = out_dir / f"{TMP_PREFIX}old-{step:07d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(out_dir)
    return final


def _before_rename(tmp: Path) -> None:
    """Nothing; the crash tests replace it to kill the process at the worst moment."""


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


# --- optimizer: tensors in safetensors, everything else in JSON


def save_optimizer(optimizer: torch.optim.Optimizer, names: list[str], folder: Path, state: dict | None = None) -> None:
    """`names[i]` is the parameter at index i of the optimizer's state dict (checked again on load). `state`: the
    optimizer's state dict already gathered whole (FSDP), else optimizer.state_dict()."""
    state = optimizer.state_dict() if state is None else state
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    meta = {"param_names": names, "param_groups": state["param_groups"], "scalars": scalars}
    (folder / "optimizer.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], folder: Path, place=None) -> None:
    """`place(index, tensor)` puts a whole saved tensor where parameter `index`'s state lives (FSDP shards it)."""
    meta = json.loads((folder / "optimizer.json").read_text())
    if meta["param_names"] != names:
        raise CheckpointError(f"{folder}: the optimizer was saved for other parameters (different model or LoRA "
                              "targets); start a new out_dir or set checkpoint.resume: false")
    state: dict[int, dict] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        index, _, name = key.partition(".")
        if place is not None and value.dim() > 0:  # per-element state (exp_avg, exp_avg_sq), not the step count
            value = place(int(index), value)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- RNG states (python, numpy, torch, cuda) as JSON


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "trainer" / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint}: unreadable trainer/state.json ({exc})") from None
