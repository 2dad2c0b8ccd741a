"""A short CUDA check of tinylm (run where a GPU is lent): per family, tinylm's logits on CUDA against
transformers' on CUDA (float32), greedy engine tokens equal to transformers' greedy, and one bf16 throughput figure.

    PYTHONPATH=. python3 scripts/cuda_check.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import transformers

import tinylm
from tinylm.tiny import FAMILIES, make_tiny

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]


def family_parity(arch: str, folder: Path) -> str:
    llm = tinylm.load(folder, dtype="float32", device="cuda")
    ids = torch.tensor([PROMPT], device="cuda")
    ours = llm.forward(ids).logits.float()
    if arch == "qed":
        return f"{arch}: logits {tuple(ours.shape)} finite={bool(torch.isfinite(ours).all())} (no transformers class)"
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
        ref_tokens = ref_model.generate(ids, max_new_tokens=12, do_sample=False)[0, len(PROMPT):].tolist()
    greedy = tinylm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = llm.generate([PROMPT], greedy)[0].token_ids
    diff = (ours - ref).abs().max().item()
    return f"{arch}: max |logit diff| {diff:.2e} {'OK' if diff < 1e-3 else 'FAIL'}; greedy tokens equal: {tokens == ref_tokens}"


def throughput(folder: Path) -> str:
    llm = tinylm.load(folder, dtype="bfloat16", device="cuda")
    params = tinylm.SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    prompts = [[(i * 7 + j) % 500 + 3 for j in range(16)] for i in range(16)]
    llm.generate(prompts[:2], tinylm.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return f"tiny llama bf16, 16 prompts x 128 tokens: {tokens / seconds:.0f} tok/s end to end (eager engine)"


def structured(folder: Path) -> str:
    """JSON-schema and regex constraints on CUDA (the masks are built on the CPU and moved to the logits' device)."""
    import json
    import re

    from tinylm.sampling_params import StructuredOutputsParams

    llm = tinylm.load(folder, dtype="bfloat16", device="cuda")
    schema = {"type": "object", "additionalProperties": False, "required": ["n", "ok"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}
    prompts = [[(i * 7 + j) % 500 + 3 for j in range(8)] for i in range(4)]
    outs = llm.generate(prompts, tinylm.SamplingParams(max_tokens=40, temperature=0.8, seed=1,
                                                       structured_outputs=StructuredOutputsParams(json=schema)))
    valid = sum(set(json.loads(o.text)) == {"n", "ok"} for o in outs)
    regex = r"[a-z]{2,6}( [a-z]{2,6}){2}"
    outs = llm.generate(prompts, tinylm.SamplingParams(max_tokens=40, temperature=0,
                                                       structured_outputs=StructuredOutputsParams(regex=regex)))
    matched = sum(bool(re.fullmatch(regex, o.text)) for o in outs)
    return f"structured outputs on CUDA: JSON valid {valid}/4, regex matched {matched}/4"


def step_profile(folder: Path) -> str:
    """Where an eager decode step's time goes on CUDA (host syncs show up as aten::item / _local_scalar_dense)."""
    from torch.profiler import ProfilerActivity, profile

    llm = tinylm.load(folder, dtype="bfloat16", device="cuda")
    engine = llm.engine
    params = tinylm.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for i in range(16):
        engine.add_request(str(i), [(i * 7 + j) % 500 + 3 for j in range(16)], params)
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / 10 * 1e3
    while engine.has_unfinished():
        engine.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    return f"decode step at batch 16 (profiled): {step_ms:.1f} ms\n{table}"


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(0), "transformers", transformers.__version__, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in FAMILIES:
            try:
                print(family_parity(arch, make_tiny(arch, Path(tmp) / arch, seed=3)), flush=True)
            except Exception as exc:  # noqa: BLE001  (report every family)
                print(f"{arch}: ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        print(throughput(Path(tmp) / "llama"), flush=True)
        for check in (structured, step_profile):
            try:
                print(check(Path(tmp) / "llama"), flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"{check.__name__}: ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
