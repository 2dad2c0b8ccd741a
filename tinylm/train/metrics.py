"""Run logs: JSON lines (one object per logged step, evaluation and checkpoint) and MFU.

MFU = FLOPs per token x tokens/s / (peak FLOP/s x processes). FLOPs per token = 6 N + 6 L d T: N the parameters the
forward multiplies by (every parameter, a tied embedding once, an untied input embedding left out: it is a lookup),
forward 2 N and backward 4 N; plus attention's scores and weighted sum, 12 L d T (PaLM, appendix B) halved because a
causal kernel skips the masked half (L softmax-attention layers, d = heads x head_dim, T the sequence length).
LoRA's cheaper backward is ignored. The peak is measured: the best rate of a large matmul in the step's dtype on
this device (`measured_peak_flops`), so MFU says how close the step comes to what this machine's matmuls reach,
not to a datasheet (set train.peak_flops to use a datasheet figure).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

# Datasheet-style peaks (GPUs: the vendor's dense bf16 tensor-core figure; fp32 runs use TF32: half of it), kept
# for comparison: the trainer and the benchmark use measured_peak_flops unless train.peak_flops is set.
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


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 N + 6 L d T (module docstring): training FLOPs per token at sequence length T."""
    c = model.config
    attention_layers = sum(1 for i in range(c.num_hidden_layers) if c.layer_type(i) != "linear_attention")
    return 6 * flop_params(model) + 6 * attention_layers * c.num_attention_heads * c.head_dim * seq_len


def mfu(flops_token: float, tokens_per_s: float, peak_flops: float) -> float:
    return flops_token * tokens_per_s / peak_flops


_MEASURED: dict[tuple[str, torch.dtype], float] = {}


def measured_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.5) -> float:
    """The best FLOP/s of (size x size) @ (size x size) in `dtype` on `device` over about `seconds`: a quick probe
    (cached per process). On CPU it uses torch's threads, as the step does."""
    key = (str(device), dtype)
    size = 8192 if device.type == "cuda" else size  # a GPU needs a large product to reach its rate
    if key not in _MEASURED:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        best, started = float("inf"), time.perf_counter()
        for i in range(100):
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first product warms up (oneDNN primitive creation, AMX tile setup)
                best = min(best, time.perf_counter() - t0)
            if i >= 3 and time.perf_counter() - started > seconds:
                break
        _MEASURED[key] = 2 * size ** 3 / best
    return _MEASURED[key]


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
