"""Results on disk and on screen: one JSON per run, a CSV summary with one row per model, comparison tables.

The summary (`<output>/summary.csv`) has one row per (model, dtype, quantize): model, dtype, quantize, tokens
(training tokens of a checkpoint, when known), average (of the task columns), then one column per task holding the
task's score in the chosen metric ("primary": acc_norm where lm-eval's YAML reports it, i.e. hellaswag and ARC, acc
elsewhere). A new run of the same model, dtype and quantize replaces its row; other rows stay.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from pathlib import Path

KEY = ("model", "dtype", "quantize")
FIXED = [*KEY, "tokens", "average"]


def metric_of(result: dict, metric: str) -> float | None:
    name = result.get("metric", "acc") if metric == "primary" else metric
    return result.get(name)


def summary_row(run: dict, metric: str = "primary") -> dict:
    row = {"model": run["model"], "dtype": run["dtype"], "quantize": run["quantize"] or "none",
           "tokens": run.get("tokens")}
    scores = {task: metric_of(result, metric) for task, result in run["results"].items()}
    values = [v for v in scores.values() if v is not None]
    row["average"] = sum(values) / len(values) if values else None
    return {**row, **scores}


def write_json(out_dir: Path, run: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(run.get("time", time.time())))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{run['model']}_{run['dtype']}_{run['quantize'] or 'none'}")
    path = Path(out_dir) / f"results_{slug}_{stamp}.json"
    _atomic_write(path, json.dumps(run, indent=2) + "\n")
    return path


def update_summary(path: Path, rows: list[dict]) -> list[dict]:
    """Upsert `rows` into the CSV at `path` (by model, dtype, quantize); returns every row now in it."""
    kept = [r for r in read_summary(path) if tuple(r[k] for k in KEY) not in {tuple(n[k] for k in KEY) for n in rows}]
    all_rows = kept + rows
    tasks = [t for t in dict.fromkeys(c for r in all_rows for c in r if c not in FIXED)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIXED + tasks, lineterminator="\n")
    writer.writeheader()
    for row in all_rows:
        writer.writerow({k: _cell(row.get(k)) for k in FIXED + tasks})
    _atomic_write(path, buffer.getvalue())
    return all_rows


def read_summary(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def format_table(rows: list[dict]) -> str:
    """A Markdown table like the QED-75M card's: Model | Average | one column per task."""
    tasks = [t for t in dict.fromkeys(c for r in rows for c in r if c not in FIXED)]
    head = ["Model", "dtype", "quantize"] + (["tokens"] if any(r.get("tokens") for r in rows) else [])
    lines = ["| " + " | ".join(head + ["Average"] + [_title(t) for t in tasks]) + " |",
             "|" + "---|" * len(head) + "---:|" * (len(tasks) + 1)]
    for r in rows:
        cells = [f"`{r['model']}`", str(r["dtype"]), str(r["quantize"])]
        cells += [_tokens(r.get("tokens"))] if "tokens" in head else []
        cells += [_score(r.get("average"))] + [_score(r.get(t)) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_run(run: dict) -> str:
    """Per-task results of one run, in lm-eval's layout: task, metric, value, stderr, n."""
    lines = [f"{run['model']} ({run['dtype']}, quantize={run['quantize'] or 'none'}, "
             f"{run['settings']['num_fewshot']}-shot)",
             "| Task | Metric | Value | Stderr | n |", "|---|---|---:|---:|---:|"]
    for task, result in run["results"].items():
        for metric in result.get("reported_metrics", ["acc"]):
            stderr = result.get(f"{metric}_stderr")
            lines.append(f"| {task} | {metric} | {result[metric]:.4f} | "
                         f"{'N/A' if stderr is None else f'{stderr:.4f}'} | {result['n']} |")
    return "\n".join(lines)


def _title(task: str) -> str:
    return {"arc_challenge": "arc:challenge", "arc_easy": "arc:easy"}.get(task, task)


def _score(value) -> str:
    return "" if value is None else f"{value:.6f}"


def _tokens(value) -> str:
    if not value:
        return ""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.4g}{unit}"
    return str(int(value))


def _cell(value):
    return "" if value is None else value


def _parse(key: str, value: str):
    if key in KEY or value in ("", None):
        return value if key in KEY else None
    return int(float(value)) if key == "tokens" else float(value)


def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

