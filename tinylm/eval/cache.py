"""Per-example results cache: an interrupted evaluation resumes where it stopped.

One JSON Lines file per (model fingerprint, task), under `<output>/cache/<fingerprint>/<task>.jsonl`. The fingerprint
covers the model's files (names, sizes, modification times), dtype, quantization, device, context and BOS setting.
Each line holds one example's log-likelihoods, keyed by its group (MMLU subject) and index and by a digest of its
requests' exact text, so a change of data, few-shot count or seed misses the cache instead of reusing stale numbers.
Lines are appended whole and flushed as each example completes; a line cut short by a crash is ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tinylm.eval.prompts import Request


def requests_digest(requests: list[Request]) -> str:
    text = json.dumps([[r.context, r.continuation] for r in requests], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_fingerprint(source: Path, **settings) -> str:
    """A short hash of the model's files and the settings that change its numbers."""
    source = Path(source)
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"files": stats, "source": str(source.resolve()), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ResultCache:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.records: dict[tuple[str, int, str], dict] = {}  # (group, index, digest): 0- and 5-shot both stay
        self._file = None
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                self.records[(record["g"], record["i"], record["h"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line a crash cut short

    def get(self, group: str, index: int, digest: str) -> dict | None:
        return self.records.get((group, index, digest))

    def put(self, group: str, index: int, digest: str, lls: list[float], greedy: list[bool]) -> None:
        record = {"g": group, "i": index, "h": digest, "ll": lls, "greedy": greedy}
        self.records[(group, index, digest)] = record
        if self.path is None:
            return
        if self._file is None:
            self._file = self._open()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
        handle = open(self.path, "a", encoding="utf-8")
        if torn:  # end the cut line, so the next record starts on its own line
            handle.write("\n")
        return handle

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
