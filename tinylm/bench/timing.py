"""Timing shared by `tinylm bench` and the studies in benchmarks/: when each token arrived, the figures made from
those times, best-of and paired rounds, and which machine a figure was taken on.

Every system (tinylm's stream, transformers' generate, llama.cpp, HTTP clients of `tinylm serve`) reports the same
thing, a Stamps: when the run started and when each sequence got each token. One function turns that into figures,
so a tokens/s means the same for all of them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Stamps:
    """One run: its start and, per sequence, the time each generated token arrived (time.perf_counter seconds)."""

    start: float
    tokens: list[list[float]]
    ids: list[list[int]] | None = None  # the generated token ids, where a study compares them


@dataclass
class Result:
    system: str
    batch: int
    ttft_ms: float  # until every prompt has its first token
    ttft_p50_ms: float  # the median prompt's first token
    prefill_tok_s: float  # batch x prompt tokens over ttft_ms
    decode_tok_s: float  # tokens after each prompt's first, over the time after the last first token
    end_to_end_tok_s: float  # every generated token over the whole run
    itl_p50_ms: float  # gaps between a sequence's consecutive tokens
    itl_p99_ms: float
    peak_rss_gib: float | None  # None off Linux, or when several systems share the process (--pairs)


def figures(system: str, stamps: Stamps, prompt_tokens: int, peak_rss_gib: float | None = None) -> Result:
    firsts = [times[0] for times in stamps.tokens]
    last_first, end = max(firsts), max(times[-1] for times in stamps.tokens)
    batch, count = len(stamps.tokens), sum(map(len, stamps.tokens))
    gaps = [b - a for times in stamps.tokens for a, b in zip(times, times[1:])]
    ttft = last_first - stamps.start
    return Result(system, batch, ttft * 1e3, (percentile(firsts, 50) - stamps.start) * 1e3,
                  batch * prompt_tokens / ttft, (count - batch) / max(end - last_first, 1e-9),
                  count / (end - stamps.start), percentile(gaps, 50) * 1e3, percentile(gaps, 99) * 1e3, peak_rss_gib)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (no interpolation: a reported latency is one that happened)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def random_prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    """Seeded random token ids: every model, with or without a tokenizer, gets the same work."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def stream_stamps(llm, prompts: list, params) -> Stamps:
    """tinylm's streaming API: one event per generated token, stamped as it comes."""
    tokens: list[list[float]] = [[] for _ in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for event in llm.stream(prompts, params):
        tokens[event.index].append(time.perf_counter())
        ids[event.index].append(event.token_id)
    return Stamps(start, tokens, ids)


def transformers_stamps(model, prompts: list[list[int]], new_tokens: int, **generate_kwargs) -> Stamps:
    """transformers' greedy `generate` on equal-length prompts (no padding), exactly `new_tokens` each (EOS
    suppressed by min_new_tokens). A stopping criterion runs after every step; it stamps each token the step added,
    so that steps adding several (prompt lookup) are counted right."""
    from transformers import StoppingCriteria

    ids = torch.tensor(prompts, device=model.device)
    times: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            now = time.perf_counter()
            times.extend([now] * (input_ids.shape[1] - ids.shape[1] - len(times)))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, stopping_criteria=[Stamp()], pad_token_id=0,
                             **generate_kwargs)
    return Stamps(start, [list(times) for _ in prompts], out[:, ids.shape[1]:].tolist())


def best_of(run: Callable[[], Result], repeats: int) -> Result:
    """The fastest of `repeats` whole runs end to end (one run's figures, never a mix of runs)."""
    return max((run() for _ in range(repeats)), key=lambda r: r.end_to_end_tok_s)


def paired_rounds(runs: dict[str, Callable[[], Result]], rounds: int) -> dict[str, list[Result]]:
    """Each round runs every system once, back to back, the order rotating by one per round: the shared VM's
    speed drifts 10-25% between minutes, and systems timed over the same seconds see the same machine."""
    names = list(runs)
    out: dict[str, list[Result]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(runs[name]())
    return out


def machine_info() -> dict:
    """What a figure was taken on: CPU model and cores, memory, ISA torch dispatches to, threads, GPU if any."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(memory, 1), "arch": platform.machine(),
            "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "gpu": gpu}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line for a study's header."""
    m = machine_info()
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, {m['isa']}, {m['threads']} threads; "
            f"torch {torch.__version__}")


def versions() -> dict:
    """torch, tinylm and Python, the reference systems where this process imported them, and the git commit
    ("-dirty" when the checkout had uncommitted changes)."""
    import tinylm

    found = {"torch": torch.__version__, "tinylm": tinylm.__version__, "python": platform.python_version()}
    for module in ("transformers", "llama_cpp"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "unknown")
    found["commit"] = _git_commit(Path(tinylm.__file__).resolve().parent)
    return found


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # an installed copy, outside a checkout
        return None
    return out.stdout.strip() or None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
