"""Markdown from `tinylm bench --json` documents: one section per run (command, machine and ISA, date, versions,
what each system ran), a table of figures per system and batch size, and a table of tinylm's ratios.

    tinylm bench --compare transformers --json > run.json
    python -m tinylm.bench.report run.json [more.json ...] > tables.md

`tinylm bench` without --json prints the same tables (render(document, heading=False)).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def render(document: dict, heading: bool = True) -> str:
    parts = [_heading(document)] if heading else []
    parts.append(figures_table(document["results"]))
    if document["ratios"]:
        parts.append(ratios_table(document["ratios"]))
    parts.append(provenance(document))
    return "\n\n".join(parts)


def _heading(document: dict) -> str:
    settings, model = document["settings"], document["model"]
    name = f"{model['shape']} shape, random weights" if model.get("shape") else Path(model["source"]).name
    mode = ", through tinylm serve" if settings.get("serve") else ""
    batches = " ".join(map(str, settings["batch"]))
    return f"### {name}, batch {batches}{mode} ({document['date'][:10]})"


def figures_table(results: list[dict]) -> str:
    lines = ["| system | batch | first token ms (median / all) | prefill tok/s | decode tok/s | end-to-end tok/s | "
             "inter-token ms (p50 / p99) | peak RSS GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        peak = "" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
        lines.append(f"| {r['system']} | {r['batch']} | {r['ttft_p50_ms']:.0f} / {r['ttft_ms']:.0f} | "
                     f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['end_to_end_tok_s']:.1f} | "
                     f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {peak} |")
    return "\n".join(lines)


def ratios_table(ratios: list[dict]) -> str:
    paired = any("rounds" in entry for entry in ratios)
    extra = " decode, rounds (median, lowest) | end-to-end, rounds (median, lowest) |" if paired else ""
    lines = ["| batch | tinylm vs | decode (best runs) | end-to-end (best runs) |" + extra,
             "|---:|---|---:|---:|" + ("---:|---:|" if paired else "")]
    for entry in ratios:
        line = f"| {entry['batch']} | {entry['reference']} | {entry['decode']:.2f}x | {entry['end_to_end']:.2f}x |"
        if paired:
            rounds = entry.get("rounds")
            line += (f" {rounds['decode_median']:.2f}x, {rounds['decode_lowest']:.2f}x |"
                     f" {rounds['end_to_end_median']:.2f}x, {rounds['end_to_end_lowest']:.2f}x |" if rounds
                     else " | |")
        lines.append(line)
    return "\n".join(lines)


def provenance(document: dict) -> str:
    m, v, s = document["machine"], document["versions"], document["settings"]
    found = ", ".join(f"{name} {v[name]}" for name in ("torch", "transformers", "llama_cpp") if v.get(name))
    commit = f" (commit {v['commit']})" if v.get("commit") else ""
    lines = [f"- **Command**: `{document['command']}`",
             f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, ISA {document['isa']}, "
             f"{m['threads']} threads" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             f"- **Date**: {document['date']}; {found}; tinylm {v['tinylm']}{commit}",
             f"- **Work**: {s['prompt_tokens']} random prompt tokens and {s['new_tokens']} new tokens per prompt, "
             f"greedy, EOS ignored; the fastest of {s['repeats']} runs end to end"
             + (f"; {s['pairs']} paired rounds" if s.get("pairs") else "")]
    lines += [f"- **{name}**: {info['label']}; load {info['load_s']:.1f} s, warm-up {info.get('warmup_s', 0):.1f} s"
              for name, info in document["systems"].items()]
    lines += [f"- Note: {note}" for note in document["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinylm.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json")
    args = parser.parse_args(argv)
    sections = []
    for path in args.results:
        try:
            sections.append(render(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError) as exc:
            print(f"tinylm bench report: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
