"""Prompts and few-shot contexts, built as lm-evaluation-harness builds them for multiple-choice tasks.

- Each choice becomes one loglikelihood request (context, continuation): `(ctx, " " + choice)`; for a multiple-input
  task (winogrande) the choices are in the context instead: `(ctx + choice, " " + target)`.
  (`ConfigurableTask.construct_requests`, lm_eval/api/task.py)
- ctx = description + few-shot examples + doc_to_text(doc). A few-shot example is `text + " " + gold choice` (for
  multiple-input tasks `gold choice's context + " " + target`) followed by "\\n\\n". (`ContextSampler.get_context`,
  lm_eval/api/samplers.py; target_delimiter " ", fewshot_delimiter "\\n\\n")
- Few-shot examples come from the task's few-shot split. The "random" sampler is lm-eval's default one:
  one `random.Random(1234)` per task (lm-eval's `fewshot_random_seed` default), and for each evaluated doc in order
  `rnd.sample(pool, k)`, dropping the doc itself if drawn. "first_n" (MMLU) takes the first k rows of `dev`.
  With the same files, seed and k, the examples chosen are the ones lm-eval chooses, `--limit` included.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tinylm.eval.loading import TaskGroup
from tinylm.eval.tasks import Doc, TaskSpec

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


def fewshot_example(doc: Doc) -> str:
    if doc.text is None:
        return doc.choices[doc.gold] + TARGET_DELIMITER + doc.target
    return doc.text + TARGET_DELIMITER + doc.choices[doc.gold]


def requests_for(doc: Doc, examples: list[Doc] = ()) -> list[Request]:
    """One request per choice, in choice order."""
    prefix = doc.description + "".join(fewshot_example(e) + FEWSHOT_DELIMITER for e in examples)
    if doc.text is None:
        return [Request(prefix + choice, TARGET_DELIMITER + doc.target) for choice in doc.choices]
    return [Request(prefix + doc.text, TARGET_DELIMITER + choice) for choice in doc.choices]


def draw_fewshot(spec: TaskSpec, pool: list[Doc], doc: Doc, k: int, rnd: random.Random) -> list[Doc]:
    drawn = pool[:k] if spec.sampler == "first_n" else rnd.sample(pool, k)
    return [d for d in drawn if d.row != doc.row][:k]


def build_requests(spec: TaskSpec, group: TaskGroup, num_fewshot: int, limit: int | None = None,
                   seed: int = FEWSHOT_SEED) -> list[list[Request]]:
    """Requests for the group's first `limit` docs (all when None), drawing few-shot examples in doc order."""
    rnd = random.Random(seed)
    docs = group.docs if limit is None else group.docs[:limit]
    return [requests_for(doc, draw_fewshot(spec, group.pool, doc, num_fewshot, rnd) if num_fewshot else [])
            for doc in docs]
