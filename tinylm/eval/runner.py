"""Evaluating one model on multiple-choice tasks: requests, cached results, batched scoring, metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tinylm.eval.cache import ResultCache, requests_digest
from tinylm.eval.loading import load_groups
from tinylm.eval.loglikelihood import Scorer
from tinylm.eval.metrics import doc_scores, summarize_groups
from tinylm.eval.prompts import FEWSHOT_SEED, Request, build_requests
from tinylm.eval.tasks import Doc, TaskSpec


@dataclass
class Item:
    """One example to score: its doc, its requests (one per choice) and their results once known."""

    group: str
    index: int
    doc: Doc
    requests: list[Request]
    digest: str
    lls: list[float] | None = None


@dataclass
class Settings:
    num_fewshot: int = 0
    limit: int | None = None  # first N docs of each task (of each MMLU subject, as lm-eval's --limit)
    batch_size: int = 8
    seed: int = FEWSHOT_SEED
    progress: bool = True


def evaluate(scorer: Scorer, specs: list[TaskSpec], data_dir: Path, settings: Settings,
             cache_dir: Path | None = None) -> dict[str, dict]:
    """{task name: result} for each task, in order."""
    out = {}
    for spec in specs:
        cache = ResultCache(cache_dir / f"{spec.name}.jsonl" if cache_dir is not None else None)
        try:
            out[spec.name] = evaluate_task(scorer, spec, Path(data_dir), settings, cache)
        finally:
            cache.close()
    return out


def evaluate_task(scorer: Scorer, spec: TaskSpec, data_dir: Path, settings: Settings, cache: ResultCache) -> dict:
    start = time.perf_counter()
    items = build_items(spec, data_dir, settings)
    pending = [item for item in items if not _from_cache(item, cache)]
    _score(scorer, pending, cache, settings, spec.name)
    seconds = time.perf_counter() - start
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(doc_scores(item.lls, item.doc.choices, item.doc.gold))
    result = {"metric": spec.primary_metric, "reported_metrics": list(spec.metrics), **summarize_groups(groups)}
    result["timing"] = {"seconds": round(seconds, 3), "scored": len(pending), "cached": len(items) - len(pending),
                        "requests": sum(len(i.requests) for i in pending),
                        "examples_per_s": round(len(pending) / seconds, 3) if pending else None}
    return result


def build_items(spec: TaskSpec, data_dir: Path, settings: Settings) -> list[Item]:
    items = []
    for group in load_groups(data_dir, spec, settings.num_fewshot):
        requests = build_requests(spec, group, settings.num_fewshot, settings.limit, settings.seed)
        items += [Item(group.name, i, doc, reqs, requests_digest(reqs))
                  for i, (doc, reqs) in enumerate(zip(group.docs, requests))]
    return items


def _from_cache(item: Item, cache: ResultCache) -> bool:
    record = cache.get(item.group, item.index, item.digest)
    if record is None or len(record["ll"]) != len(item.requests):
        return False
    item.lls = record["ll"]
    return True


def _score(scorer: Scorer, items: list[Item], cache: ResultCache, settings: Settings, name: str) -> None:
    """Score every request of `items`; each item goes to the cache as soon as all its choices are scored."""
    pairs, owners = [], []
    for item in items:
        for choice, request in enumerate(item.requests):
            pairs.append(scorer.encode_pair(request.context, request.continuation))
            owners.append((item, choice))
    lls = {id(item): [0.0] * len(item.requests) for item in items}
    greedy = {id(item): [False] * len(item.requests) for item in items}
    left = {id(item): len(item.requests) for item in items}
    # examples/s and the ETA, counted in whole examples (all choices scored)
    with tqdm(total=len(items), desc=name, unit="example", disable=not settings.progress or not pairs) as bar:
        for batch in scorer.score(pairs, settings.batch_size):
            done = 0
            for index, ll, is_greedy in batch:
                item, choice = owners[index]
                lls[id(item)][choice], greedy[id(item)][choice] = ll, is_greedy
                left[id(item)] -= 1
                if left[id(item)] == 0:
                    item.lls = lls[id(item)]
                    cache.put(item.group, item.index, item.digest, item.lls, greedy[id(item)])
                    done += 1
            bar.update(done)
