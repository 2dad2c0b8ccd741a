"""Multiple-choice scoring speed, tinylm vs transformers, side by side in one run, on the same GGUF weights.

    .venv/bin/python benchmarks/eval_mc.py --dtypes float32 bfloat16 --examples 64 --batch-size 8

Both sides score the same requests with the same scorer (tinylm.eval's lm-eval-style batching: sorted longest
first, right-padded, identical inputs shared), so the batches are identical and only the forward differs: tinylm's
`llm.forward` vs transformers' `model(input_ids).logits` on the model it loads from the same GGUF. Examples are
HellaSwag-shaped (a context of about 60-90 tokens, four endings of about 8-25 tokens) generated from a fixed seed,
or the first --examples of a real task with --data-dir/--task. examples/s = examples / scoring seconds
(tokenization excluded, done once); best of --repeats. Also printed: the largest log-likelihood difference between
the two and the share of examples where both pick the same choice.
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
from tinylm.eval.loglikelihood import Scorer, prefix_token_id
from tinylm.eval.prompts import requests_for
from tinylm.eval.runner import Settings, build_items
from tinylm.eval.tasks import TASKS, Doc

_WORDS = ("the a man woman child dog city river garden kitchen ball book table window road house tree light water "
          "slowly quickly carefully happily walks runs opens closes picks holds throws paints reads cleans builds "
          "red green small large old new bright quiet warm cold wooden metal then and while before after with "
          "into onto under over near behind across").split()


def synthetic_docs(n: int, seed: int = 0) -> list[Doc]:
    rnd = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(lo, hi))).capitalize() + "."

    docs = []
    for _ in range(n):
        text = "Activity: " + " ".join(sentence(10, 18) for _ in range(4)) + " Then the person"
        docs.append(Doc(text=text, choices=[sentence(6, 20) for _ in range(4)], gold=0))
    return docs


def time_scoring(scorer: Scorer, pairs, batch_size: int) -> tuple[float, dict[int, float]]:
    start = time.perf_counter()
    with torch.inference_mode():
        lls = {i: ll for batch in scorer.score(pairs, batch_size) for i, ll, _ in batch}
    return time.perf_counter() - start, lls


def predictions(lls: dict[int, float], sizes: list[int]) -> list[int]:
    out, start = [], 0
    for size in sizes:
        out.append(max(range(size), key=lambda j: lls[start + j]))
        start += size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=None, help="real task files instead of synthetic examples")
    parser.add_argument("--task", default="hellaswag")
    args = parser.parse_args()

    gguf = hub.resolve(args.model)
    if args.data_dir:
        items = build_items(TASKS[args.task], args.data_dir, Settings(limit=args.examples))[:args.examples]
        requests = [item.requests for item in items]
    else:
        requests = [requests_for(doc) for doc in synthetic_docs(args.examples)]
    print(f"machine: {machine_line()}")
    print(f"model: {gguf.name}; {len(requests)} examples, {sum(map(len, requests))} requests, "
          f"batch {args.batch_size}")
    print("| dtype | tinylm examples/s | transformers examples/s | ratio | max abs ll diff | same choice |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes:
        llm = tinylm.load(gguf, dtype=dtype)
        ours = Scorer.from_llm(llm)
        pairs = [ours.encode_pair(r.context, r.continuation) for reqs in requests for r in reqs]
        model = load_transformers(gguf, dtype)
        theirs = Scorer(lambda ids: model(ids).logits, llm.tokenizer, ours.max_length, prefix_token_id(llm))
        runs_ours, runs_theirs = [], []
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            runs_ours.append(time_scoring(ours, pairs, args.batch_size))
            runs_theirs.append(time_scoring(theirs, pairs, args.batch_size))
        t_ours, ll_ours = min(runs_ours, key=lambda r: r[0])
        t_theirs, ll_theirs = min(runs_theirs, key=lambda r: r[0])
        sizes = [len(r) for r in requests]
        same = sum(a == b for a, b in zip(predictions(ll_ours, sizes), predictions(ll_theirs, sizes))) / len(sizes)
        diff = max(abs(ll_ours[i] - ll_theirs[i]) for i in ll_ours)
        n = len(requests)
        print(f"| {dtype} | {n / t_ours:.2f} | {n / t_theirs:.2f} | {t_theirs / t_ours:.2f} | {diff:.4f} | "
              f"{same:.0%} |", flush=True)
        del llm, model


if __name__ == "__main__":
    main()
