"""PNG plots of summary rows (matplotlib, Agg backend, imported only here).

Rows that all know their training tokens (a checkpoint series) give score against training tokens, one line per
task plus the average; other rows (models, dtypes, quantizations side by side) give grouped bars per task, with each
task's chance level dashed.
"""

from __future__ import annotations

from pathlib import Path

from tinylm.eval.data import EvalDataError
from tinylm.eval.results import FIXED

CHANCE = {"hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "winogrande": 0.5, "commonsense_qa": 0.2,
          "mmlu": 0.25}


def plot_rows(rows: list[dict], out: Path, metric: str = "primary", title: str | None = None) -> Path:
    if not rows:
        raise EvalDataError("nothing to plot: no results")
    try:
        import matplotlib
    except ImportError:
        raise EvalDataError("plotting needs matplotlib: pip install 'tinylm[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in dict.fromkeys(c for r in rows for c in r if c not in FIXED)]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    if all(r.get("tokens") for r in rows):
        _series(ax, sorted(rows, key=lambda r: r["tokens"]), tasks)
    else:
        _bars(ax, rows, tasks)
    ax.set_ylabel(f"score ({'acc_norm for hellaswag/ARC, acc otherwise' if metric == 'primary' else metric})")
    ax.set_title(title or "tinylm eval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _series(ax, rows: list[dict], tasks: list[str]) -> None:
    tokens = [r["tokens"] for r in rows]
    for task in tasks:
        ax.plot(tokens, [r.get(task) for r in rows], marker="o", label=task)
    ax.plot(tokens, [r.get("average") for r in rows], marker="s", color="black", linewidth=2.5, label="average")
    if max(tokens) > 10 * min(tokens):
        ax.set_xscale("log")
    ax.set_xlabel("training tokens")


def _bars(ax, rows: list[dict], tasks: list[str]) -> None:
    columns = tasks + ["average"]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        label = f"{row['model']} {row['dtype']}" + (f" {row['quantize']}" if row["quantize"] != "none" else "")
        xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(xs, [row.get(c) or 0.0 for c in columns], width=width, label=label)
    for c, task in enumerate(columns):
        if task in CHANCE:
            ax.hlines(CHANCE[task], c - 0.45, c + 0.45, colors="black", linestyles="dashed", linewidth=1, zorder=3)
    ax.set_xticks(range(len(columns)), columns, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_xlabel("task (dashed: chance)")
