"""Finding and reading a task's split files under --data-dir.

For a task whose folder is F (with Hugging Face config folder C) and a split S, the first of these that exists is read:

    DIR/F/C/S.parquet | S.jsonl            DIR/F/S.parquet | S.jsonl
    DIR/F/C/S-*.parquet | S-*.jsonl        DIR/F/S-*.parquet | S-*.jsonl     (shards, read in name order)
    DIR/F/C/<the original release's file name for S>   DIR/F/<the same>        (MMLU: test/*_test.csv, the release's CSVs)
    DIR/F/*/S.parquet | S.jsonl | S-*.parquet | S-*.jsonl                     (MMLU: cais/mmlu's per-subject configs)

so a snapshot of the Hugging Face dataset repository (`huggingface-cli download allenai/ai2_arc --repo-type dataset
--local-dir DIR/ai2_arc`) works as it is, as do JSONL exports of it (`Dataset.to_json`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinylm.eval.data import EvalDataError, read_rows
from tinylm.eval.tasks import Doc, TaskSpec


@dataclass
class TaskGroup:
    """The docs scored together with one few-shot pool: a whole task, or one MMLU subject."""

    name: str
    docs: list[Doc]
    pool: list[Doc]


def split_files(data_dir: Path, spec: TaskSpec, split: str) -> list[Path]:
    base = Path(data_dir) / spec.folder
    folders = [base / spec.subfolder, base] if spec.subfolder else [base]
    for pattern in (f"{split}.parquet", f"{split}.jsonl", f"{split}-*.parquet", f"{split}-*.jsonl"):
        for folder in folders:
            hits = sorted(folder.glob(pattern))
            if hits:
                return hits
    original = spec.original_files.get(split)
    for folder in folders if original else []:
        hits = sorted(folder.glob(original))
        if hits:
            return hits
    for pattern in (f"*/{split}.parquet", f"*/{split}.jsonl", f"*/{split}-*.parquet", f"*/{split}-*.jsonl"):
        hits = sorted(base.glob(pattern)) if spec.group_folders else []
        if hits:  # one folder per group (subject), each holding that group's rows
            return hits
    where = folders[0] / f"{split}.parquet"
    alt = f" or {base / original}" if original else ""
    raise EvalDataError(f"{spec.name}: no {split} split found: expected {where} (or .jsonl, or {split}-*.parquet "
                        f"shards){alt}")


def load_docs(data_dir: Path, spec: TaskSpec, split: str) -> list[Doc]:
    docs = []
    for path in split_files(data_dir, spec, split):
        for number, row in enumerate(read_rows(path), 1):
            docs.append(_doc(spec, row, path, number))
    return docs


def _doc(spec: TaskSpec, row: dict, path: Path, number: int) -> Doc:
    try:
        return spec.make_doc(row)
    except KeyError as e:
        raise EvalDataError(f"{path}: row {number}: missing field {e.args[0]!r} for {spec.name}") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise EvalDataError(f"{path}: row {number}: malformed {spec.name} row: {e}") from None


def load_groups(data_dir: Path, spec: TaskSpec, num_fewshot: int) -> list[TaskGroup]:
    """The eval split's docs (and the few-shot pool when num_fewshot > 0), grouped by MMLU subject."""
    docs = load_docs(data_dir, spec, spec.eval_split)
    if not docs:
        raise EvalDataError(f"{spec.name}: the {spec.eval_split} split has no rows")
    pool = load_docs(data_dir, spec, spec.fewshot_split) if num_fewshot > 0 else []
    names = sorted({d.group for d in docs})  # lm-eval runs each MMLU subject as its own task
    groups = [TaskGroup(n, [d for d in docs if d.group == n], [d for d in pool if d.group == n]) for n in names]
    for group in groups:
        _check_pool(spec, group, num_fewshot)
    return groups


def _check_pool(spec: TaskSpec, group: TaskGroup, num_fewshot: int) -> None:
    if num_fewshot > len(group.pool):
        where = f" for {group.name}" if group.name else ""
        raise EvalDataError(f"{spec.name}: {num_fewshot}-shot needs {num_fewshot} {spec.fewshot_split} examples"
                            f"{where}, found {len(group.pool)}")
