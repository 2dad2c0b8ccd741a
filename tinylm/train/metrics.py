"""Run logs: JSON lines (one object per logged step, evaluation and checkpoint) and MFU.

MFU = 6 N tokens/s / (peak FLOP/s x processes), N = the parameters the forward multiplies by (every parameter,
counting a tied embedding once and leaving out an untied input embedding, which is a lookup). 6 N per token is the
usual dense-model estimate (forward 2 N, backward 4 N; attention's own FLOPs and LoRA's cheaper backward ignored).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

# Peak dense FLOP/s of one process's device when train.peak_flops is not set.
# CPU: the bf16 matmul rate measured on the project's 2-core reference machine (DESIGN.md, about 350 GFLOP/s),
# and half of it for fp32. GPUs: the vendor's dense bf16 tensor-core figure (fp32 runs use TF32: half of it).
CPU_PEAK_BF16 = 350e9
_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
_GPU_PEAK_DEFAULT = 100e12


def default_peak_flops(device: torch.device, bf16: bool) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in _GPU_PEAK_BF16.items() if k in name), _GPU_PEAK_DEFAULT)
    else:
        peak = CPU_PEAK_BF16
    return peak if bf16 else peak / 2


def flop_params(model: nn.Module) -> int:
    """N of 6 N: unique parameters, minus the input embedding when it is not also the output head."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else \
        model.model.embed_tokens.weight
    if model.lm_head.weight is not embed:
        total -= embed.numel()
    return total


def mfu(params: int, tokens_per_s: float, peak_flops: float) -> float:
    return 6 * params * tokens_per_s / peak_flops


class RunLog:
    """Appends JSON lines to out_dir/log.jsonl on the main process; shows a tqdm bar when asked."""

    def __init__(self, path: Path | None, total_steps: int, start_step: int, progress: bool) -> None:
        self.path = path
        self.bar = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if path is not None and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.started = time.perf_counter()

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        record = {"time": round(time.perf_counter() - self.started, 3), **record}
        # NaN and inf are not JSON: a skipped step's loss is written as the string "nan" / "inf"
        record = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def step(self, record: dict) -> None:
        self.write(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
