"""Multiple-choice scoring speed: tinylm vs transformers vs lm-evaluation-harness's `hf` backend, in one run.

    .venv/bin/python benchmarks/eval_mc.py --shapes hellaswag mmlu --dtypes bfloat16 --examples 64 --batch-size 8

The same examples, the same weights (tinylm and transformers both load the GGUF / folder), three scorers:
- tinylm: `Scorer.from_llm` (tinylm/eval/shared_context.py: each example's context run once, its choices on top of
  the context's K/V, lm_head and log-softmax only at the continuation tokens), --batch-size examples per batch;
- transformers: lm-eval-style padded rows (context + continuation per row, sorted longest first, identical rows
  shared) through transformers' `model(input_ids).logits` (the loop tinylm itself ran before), --batch-size rows;
- lm-eval: lm_eval's `HFLM` (`pip install lm_eval`, a bench tool only) on the same transformers model and its
  tokenizer, `_loglikelihood_tokens` with --batch-size, softmax in float32 (`softmax_dtype`, so its numbers are
  comparable with the other two, which log-softmax in float32). Runs offline: the model is passed as an object.

Shapes, generated from a fixed seed through the tasks' own row parsers (tinylm/eval/tasks.py), or the first
--examples of a real task with --data-dir/--task:
- hellaswag: a HellaSwag row (activity label, a context of about 60-90 tokens, four endings of about 8-25 tokens);
- mmlu: an MMLU row (subject line, a question of 60-130 words, four lettered options; choices " A".." D");
- mmlu-5shot: the same rows after the same 5 solved rows (lm-eval's MMLU few-shot: the first 5 of the subject's
  dev split, so every question of a subject starts with the same ~800 tokens): tinylm runs that block once per
  run of examples (tinylm/eval/shared_head.py), lm-eval and transformers read it in every row.
examples/s = examples / scoring seconds (tokenization excluded, done once per system); best of --repeats, after a
warm-up on --warmup examples. Printed per shape and dtype: each system's examples/s, tinylm's ratios, each system's
acc / acc_norm (4 digits, as lm-eval prints them), the largest log-likelihood difference from tinylm and the share
of examples where each picks tinylm's choice.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import tinylm
from tinylm import hub
from tinylm.bench.systems import load_transformers
from tinylm.bench.timing import machine_line
from tinylm.engine.engine import EngineConfig
from tinylm.eval.loglikelihood import Scorer
from tinylm.eval.metrics import doc_scores
from tinylm.eval.prompts import requests_for
from tinylm.eval.runner import Settings, build_items
from tinylm.eval.tasks import TASKS, Doc

_WORDS = ("the a man woman child dog city river garden kitchen ball book table window road house tree light water "
          "slowly quickly carefully happily walks runs opens closes picks holds throws paints reads cleans builds "
          "red green small large old new bright quiet warm cold wooden metal then and while before after with "
          "into onto under over near behind across").split()


def _sentence(rnd: random.Random, lo: int, hi: int) -> str:
    return " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(lo, hi))).capitalize() + "."


def hellaswag_docs(n: int, seed: int = 0) -> list[Doc]:
    rnd = random.Random(seed)
    rows = [{"activity_label": "Activity", "ctx_a": " ".join(_sentence(rnd, 10, 18) for _ in range(4)),
             "ctx_b": "then the person", "endings": [_sentence(rnd, 6, 20) for _ in range(4)],
             "label": rnd.randrange(4)} for _ in range(n)]
    return [TASKS["hellaswag"].make_doc(row) for row in rows]


def mmlu_docs(n: int, seed: int = 0) -> list[Doc]:
    rnd = random.Random(seed)
    rows = [{"question": " ".join(_sentence(rnd, 8, 16) for _ in range(rnd.randint(6, 9))) + " Which is right?",
             "choices": [_sentence(rnd, 3, 10) for _ in range(4)], "answer": rnd.randrange(4),
             "subject": "high_school_physics"} for _ in range(n)]
    return [TASKS["mmlu"].make_doc(row) for row in rows]


def mmlu_5shot_shots(seed: int = 0) -> list[Doc]:
    """The 5 dev rows every question of the subject reads first (lm-eval's MMLU: first_n from dev)."""
    return mmlu_docs(5, seed=seed + 1000)


SHAPES = {"hellaswag": hellaswag_docs, "mmlu": mmlu_docs, "mmlu-5shot": mmlu_docs}
FEWSHOT = {"mmlu-5shot": mmlu_5shot_shots}  # shape -> its few-shot examples (the others: 0-shot)


def timed(score, repeats: int) -> tuple[float, list[float]]:
    """Best seconds of `repeats` calls of score() -> log-likelihoods in request order, and those log-likelihoods."""
    best, lls = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            lls = score()
        best = min(best, time.perf_counter() - start)
    return best, lls


def scorer_lls(scorer: Scorer, pairs, batch_size: int) -> list[float]:
    out = {i: ll for batch in scorer.score(pairs, batch_size) for i, ll, _ in batch}
    return [out[i] for i in range(len(pairs))]


def lm_eval_system(model, source: Path, batch_size: int):
    """lm_eval's HFLM on the transformers model already loaded, and the transformers tokenizer of the same source;
    None with the reason when lm_eval is not installed."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        return None, f"lm_eval not importable ({e}); pip install lm_eval"
    from transformers import AutoTokenizer

    if source.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32), None


def lm_eval_lls(lm, requests: list, batch_size: int) -> list[float]:
    return [ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=batch_size)]


def scores(lls: list[float], docs: list[Doc]) -> tuple[float, float, list[int]]:
    """acc, acc_norm over the docs (tinylm.eval.metrics, lm-eval's definitions) and each doc's acc choice."""
    acc = norm = 0.0
    picks, start = [], 0
    for doc in docs:
        mine = lls[start:start + len(doc.choices)]
        start += len(doc.choices)
        s = doc_scores(mine, doc.choices, doc.gold)
        acc, norm = acc + s["acc"], norm + s["acc_norm"]
        picks.append(max(range(len(mine)), key=lambda j: (mine[j], -j)))
    return acc / len(docs), norm / len(docs), picks


def run_shape(name: str, docs: list[Doc], ours: dict[str, Scorer], model, lm, args) -> list[str]:
    """Time every system on the docs, print their rows; return notes to print after the table."""
    shots = FEWSHOT[name]() if name in FEWSHOT else []
    requests = [r for doc in docs for r in requests_for(doc, shots)]
    first = next(iter(ours.values()))
    theirs = Scorer(lambda ids: model(ids.to(model.device)).logits, first.tokenizer, first.max_length, first.prefix_token_id)
    pairs = [first.encode_pair(r.context, r.continuation) for r in requests]
    systems = {label: (lambda p, s=scorer: scorer_lls(s, p, args.batch_size)) for label, scorer in ours.items()}
    systems["transformers"] = lambda p: scorer_lls(theirs, p, args.batch_size)
    inputs = {label: pairs for label in systems}
    notes = []
    if lm is not None:
        inputs["lm-eval"] = [((r.context, r.continuation), *lm._encode_pair(r.context, r.continuation))
                             for r in requests]
        systems["lm-eval"] = lambda p: lm_eval_lls(lm, p, args.batch_size)
        same_tokens = sum(tuple(a) == tuple(b[1:]) for a, b in zip(pairs, inputs["lm-eval"]))
        notes.append(f"{name}: lm-eval's tokenization equals tinylm's for {same_tokens}/{len(pairs)} requests")
    warm = sum(len(d.choices) for d in docs[:args.warmup])
    results = {}
    for system, score in systems.items():
        start = time.perf_counter()
        score(inputs[system][:warm])  # first calls: allocator, kernels, the compiled graphs
        if system.endswith("compiled"):
            notes.append(f"{name}: {system} warm-up (compiling) took {time.perf_counter() - start:.1f} s")
        seconds, lls = timed(lambda: score(inputs[system]), args.repeats)
        results[system] = (len(docs) / seconds, lls, *scores(lls, docs))
    print_rows(name, args.dtype_now, results)
    return notes


def print_rows(shape: str, dtype: str, results: dict) -> None:
    """One row per system; ratios are tinylm's fastest variant over each other system."""
    ours = [name for name in results if name.startswith("tinylm")]
    _, base_lls, _, _, base_picks = results[ours[0]]
    base_rate = max(results[name][0] for name in ours)
    for system, (rate, lls, acc, norm, picks) in results.items():
        ratio = "" if system in ours else f"{base_rate / rate:.2f}x"
        diff = max(abs(a - b) for a, b in zip(lls, base_lls))
        same = sum(a == b for a, b in zip(picks, base_picks)) / len(picks)
        print(f"| {shape} | {dtype} | {system} | {rate:.2f} | {ratio} | {acc:.4f} / {norm:.4f} | {diff:.4f} | "
              f"{same:.0%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (all systems on it)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=4, help="examples scored once, untimed, before timing")
    parser.add_argument("--no-lm-eval", action="store_true", help="skip lm-evaluation-harness")
    parser.add_argument("--no-batch-invariant", action="store_true",
                        help="tinylm's model without the batch-invariant kernels (aten's products, RMSNorm, SwiGLU)")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="both",
                        help="tinylm's scoring forward eager, through torch.compile, or both side by side")
    parser.add_argument("--data-dir", type=Path, default=None, help="real task files instead of synthetic examples")
    parser.add_argument("--task", default="hellaswag")
    args = parser.parse_args()

    source = hub.resolve(args.model)
    if args.data_dir:
        items = build_items(TASKS[args.task], args.data_dir, Settings(limit=args.examples))[:args.examples]
        shapes = {args.task: [item.doc for item in items]}
    else:
        shapes = {name: SHAPES[name](args.examples) for name in args.shapes}
    print(f"machine: {machine_line()}")
    print(f"model: {source.name}; {args.examples} examples per shape, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, tinylm batch invariant: {not args.no_batch_invariant}")
    print("| shape | dtype | system | examples/s | tinylm is (faster variant) | acc / acc_norm | max abs ll diff "
          "vs tinylm | same choice |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    notes = []
    for dtype in args.dtypes:
        args.dtype_now = dtype
        # tinylm.load's engine is batch invariant by default (tinylm/model/invariant.py: its own linear, RMSNorm
        # and SwiGLU kernels, also under llm.forward and this scorer); --no-batch-invariant: the library products
        llm = tinylm.LLM(source, dtype=dtype, device=args.device,
                         engine_config=EngineConfig(batch_invariant=not args.no_batch_invariant))
        ours = {label: Scorer.from_llm(llm, compile=label.endswith("compiled"))
                for label in {"no": ["tinylm"], "yes": ["tinylm compiled"],
                              "both": ["tinylm", "tinylm compiled"]}[args.compile]}
        model = load_transformers(source, dtype, args.device)
        lm, why = (None, "--no-lm-eval") if args.no_lm_eval else lm_eval_system(model, source, args.batch_size)
        if lm is None:
            notes.append(f"lm-eval skipped: {why}")
        for name, docs in shapes.items():
            notes += run_shape(name, docs, ours, model, lm, args)
        del llm, model, lm
    print("\n".join(notes))


if __name__ == "__main__":
    main()
