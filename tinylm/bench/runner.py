"""One `tinylm bench` run: each system warmed and timed per batch size (best of --repeats), paired rounds with
--pairs, ratios of tinylm to each reference, all gathered in one JSON-ready document."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from tinylm.bench.timing import Result, best_of, figures, paired_rounds, random_prompts
from tinylm.quant.memory import peak_rss, reset_peak, rss

SUBJECT = "tinylm"  # the system every ratio is taken for: tinylm / reference


@dataclass
class Plan:
    batches: list[int]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    pairs: int
    vocab: int

    def prompts(self, batch: int) -> list[list[int]]:
        return random_prompts(self.vocab, batch, self.prompt_tokens)


@dataclass
class Measured:
    model: dict = field(default_factory=dict)  # the weights' file or folder, and --shape's name
    results: list[Result] = field(default_factory=list)  # best of --repeats, per system and batch
    rounds: dict[int, dict[str, list[Result]]] = field(default_factory=dict)  # batch -> system -> one per round
    systems: dict[str, dict] = field(default_factory=dict)  # name -> label, load and warm-up seconds
    notes: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        print(f"tinylm bench: {line}", file=sys.stderr, flush=True)
        self.notes.append(line)


def measure(subject, load_s: float, openers: list[Callable[[], object]], plan: Plan, measured: Measured) -> Measured:
    """Without --pairs, one system in memory at a time (each peak resident memory is its own); with --pairs, all
    of them at once, as alternating rounds need (peak memory is then not reported)."""
    measured.systems[subject.name] = {"label": subject.label, "load_s": load_s}
    if not plan.pairs:
        _measure_alone(subject, plan, measured)
        for open_system in openers:
            _measure_alone(_open(open_system, measured), plan, measured)
        return measured
    systems = [subject] + [_open(open_system, measured) for open_system in openers]
    for system in systems:
        _best_per_batch(system, plan, measured, shared=True)
    for batch in plan.batches:
        measured.rounds[batch] = _rounds(systems, batch, plan)
    for system in systems:
        system.close()
    return measured


def _open(open_system: Callable[[], object], measured: Measured):
    start = time.perf_counter()
    system = open_system()
    measured.systems[system.name] = {"label": system.label, "load_s": time.perf_counter() - start}
    return system


def _measure_alone(system, plan: Plan, measured: Measured) -> None:
    _best_per_batch(system, plan, measured, shared=False)
    system.close()


def _best_per_batch(system, plan: Plan, measured: Measured, shared: bool) -> None:
    warm_s = 0.0
    for batch in plan.batches:
        reason = system.skip_reason(batch)
        if reason:
            measured.note(f"{system.name}: batch {batch} skipped ({reason})")
            continue
        prompts = plan.prompts(batch)
        start = time.perf_counter()
        system.warm(prompts)  # the first one compiles the decode graphs, with --compile
        warm_s += time.perf_counter() - start
        measured.results.append(best_of(lambda: _timed(system, prompts, plan, shared), plan.repeats))
    measured.systems[system.name]["warmup_s"] = warm_s


def _timed(system, prompts: list[list[int]], plan: Plan, shared: bool) -> Result:
    reset_peak()
    stamps = system.run(prompts, plan.new_tokens)
    peak = None if shared else (peak_rss() or rss())
    return figures(system.name, stamps, plan.prompt_tokens, None if peak is None else peak / 2**30)


def _rounds(systems: list, batch: int, plan: Plan) -> dict[str, list[Result]]:
    prompts = plan.prompts(batch)
    runs = {system.name: (lambda system=system: _timed(system, prompts, plan, shared=True))
            for system in systems if not system.skip_reason(batch)}
    return paired_rounds(runs, plan.pairs)


def ratios(measured: Measured) -> list[dict]:
    """tinylm / reference, per batch: of the best-of figures, and with --pairs of every round (its median and
    lowest: a drift of the machine moves both systems of a round together)."""
    ours = {r.batch: r for r in measured.results if r.system == SUBJECT}
    out = []
    for theirs in measured.results:
        if theirs.system == SUBJECT or theirs.batch not in ours:
            continue
        entry = {"batch": theirs.batch, "reference": theirs.system,
                 "decode": ours[theirs.batch].decode_tok_s / theirs.decode_tok_s,
                 "end_to_end": ours[theirs.batch].end_to_end_tok_s / theirs.end_to_end_tok_s}
        rounds = measured.rounds.get(theirs.batch, {})
        if theirs.system in rounds and SUBJECT in rounds:
            entry["rounds"] = _round_ratios(rounds[SUBJECT], rounds[theirs.system])
        out.append(entry)
    return out


def _round_ratios(ours: list[Result], theirs: list[Result]) -> dict:
    decode = [a.decode_tok_s / b.decode_tok_s for a, b in zip(ours, theirs)]
    end_to_end = [a.end_to_end_tok_s / b.end_to_end_tok_s for a, b in zip(ours, theirs)]
    return {"decode": decode, "end_to_end": end_to_end,
            "decode_median": statistics.median(decode), "decode_lowest": min(decode),
            "end_to_end_median": statistics.median(end_to_end), "end_to_end_lowest": min(end_to_end)}


def rounds_document(measured: Measured) -> list[dict]:
    return [{"round": index, **asdict(result)} for batch in measured.rounds.values()
            for results in batch.values() for index, result in enumerate(results)]
