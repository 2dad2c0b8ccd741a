"""`tinylm bench`: speed and memory of one model configuration, side by side with transformers on request.

    tinylm bench [--model M] [--dtype D] [--quantize Q] [--compile] [--draft-model D] [--batch 1 16]
                 [--prompt-tokens 128] [--new-tokens 128] [--repeats 3] [--compare transformers] [--json]

For each batch size B, B prompts of P seeded random token ids (so any model, with or without a tokenizer, gets
the same work) are generated greedily to N new tokens, EOS ignored, after one short warm-up run (and the compiled
graphs' warm-up). Reported, best of --repeats: time to the first token of every prompt (prefill), prefill tokens/s
(B x P over it), decode tokens/s (the tokens after each prompt's first over the time after the last first token),
end-to-end tokens/s, and the peak resident memory of the run (Linux). `--compare transformers` runs the same ids
through transformers' `generate` (a development dependency; GGUF files through its own GGUF loader) and adds the
ratio of decode speeds. The repository's benchmarks/ hold the fuller comparisons (llama.cpp, all quantizations).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass

import torch

from tinylm.quant.memory import peak_rss, reset_peak, rss, trim


@dataclass
class Result:
    system: str
    batch: int
    ttft_ms: float  # until every prompt has its first token
    prefill_tok_s: float
    decode_tok_s: float
    end_to_end_tok_s: float
    peak_rss_gib: float | None


def register(commands) -> None:
    from tinylm.cli import _model_args

    bench = commands.add_parser("bench", help="prefill and decode speed and memory, side by side with transformers")
    _model_args(bench)
    bench.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to run (default 1)")
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3, help="runs per batch size; the best is reported")
    bench.add_argument("--compare", choices=["transformers"], default=None,
                       help="also run the model through transformers (must be installed)")
    bench.add_argument("--json", action="store_true", help="one JSON object per result instead of a table")
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args) -> int:
    from tinylm.cli import load_from_args, resolve_dtype

    for name in ("prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.batch) < 1:
        raise ValueError(f"--batch sizes must be at least 1, got {min(args.batch)}")
    llm = load_from_args(args)
    if args.prompt_tokens + args.new_tokens > llm.config.max_position_embeddings:
        raise ValueError(f"--prompt-tokens + --new-tokens exceed the model's context "
                         f"({llm.config.max_position_embeddings})")
    llm.engine.warmup()
    results = [_best(lambda: _run_tinylm(llm, batch, args), args.repeats) for batch in args.batch]
    if args.compare:
        source, vocab = llm.loaded.source, llm.config.vocab_size
        del llm  # so that transformers' peak memory is its own
        gc.collect()
        trim()
        model = _load_transformers(source, resolve_dtype(args.dtype, args.device))
        results += [_best(lambda: _run_transformers(model, vocab, batch, args), args.repeats) for batch in args.batch]
    _print(results, args.json)
    return 0


def _prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def _run_tinylm(llm, batch: int, args) -> Result:
    import tinylm

    prompts = _prompts(llm.config.vocab_size, batch, args.prompt_tokens)
    warm = tinylm.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate(prompts, warm)
    params = tinylm.SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    reset_peak()
    start, first = time.perf_counter(), {}
    for event in llm.stream(prompts, params):
        first.setdefault(event.index, time.perf_counter())
    return _result("tinylm", batch, args, start, max(first.values()), time.perf_counter())


def _run_transformers(model, vocab: int, batch: int, args) -> Result:
    from transformers import StoppingCriteria

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor(_prompts(vocab, batch, args.prompt_tokens))
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        reset_peak()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, stopping_criteria=[Stamp()], pad_token_id=0)
    return _result("transformers", batch, args, start, stamps[0], stamps[-1])


def _result(system: str, batch: int, args, start: float, first: float, end: float) -> Result:
    peak = peak_rss() or rss()
    return Result(system, batch, (first - start) * 1e3, batch * args.prompt_tokens / (first - start),
                  batch * (args.new_tokens - 1) / max(end - first, 1e-9), batch * args.new_tokens / (end - start),
                  None if peak is None else peak / 2**30)


def _best(run, repeats: int) -> Result:
    results = [run() for _ in range(repeats)]
    return max(results, key=lambda r: r.end_to_end_tok_s)


def _load_transformers(source, dtype: str):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ValueError("--compare transformers needs transformers installed (pip install transformers)") from exc
    kwargs = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    folder = source.parent if source.suffix == ".gguf" else source
    # GGUF weights are dequantized to float32 by transformers; cast after loading, as benchmarks/decode.py does
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    return model.to(getattr(torch, dtype)).eval()


def _print(results: list[Result], as_json: bool) -> None:
    if as_json:
        for result in results:
            print(json.dumps(asdict(result)))
        return
    reference = {r.batch: r.decode_tok_s for r in results if r.system == "transformers"}
    print("| system | batch | time to first tokens ms | prefill tok/s | decode tok/s | end-to-end tok/s | peak RSS GiB"
          + (" | decode vs transformers |" if reference else " |"))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if reference else ""))
    for r in results:
        peak = "" if r.peak_rss_gib is None else f"{r.peak_rss_gib:.2f}"
        ratio = f" {r.decode_tok_s / reference[r.batch]:.2f}x |" if r.batch in reference else (" |" if reference else "")
        print(f"| {r.system} | {r.batch} | {r.ttft_ms:.0f} | {r.prefill_tok_s:.1f} | {r.decode_tok_s:.1f} | "
              f"{r.end_to_end_tok_s:.1f} | {peak} |{ratio}")
