"""The multiple-choice tasks, defined as lm-evaluation-harness defines them.

Each task turns one row of its published dataset (the Hugging Face layout, or the original release where noted) into
a `Doc`: lm-eval's doc_to_text / doc_to_choice / doc_to_target. Sources, lm-evaluation-harness `lm_eval/tasks/`:

- hellaswag: hellaswag.yaml + utils.py (`process_docs`, `preprocess`: the WikiHow bracket cleanup)
- arc_easy / arc_challenge: arc/arc_easy.yaml ("Question: {{question}}\\nAnswer:", choices.text, label index)
- winogrande: winogrande/default.yaml + preprocess_winogrande.py (partial scoring: one context per option, the text
  after the blank as the shared continuation)
- commonsense_qa: commonsense_qa/default.yaml (lettered options in the prompt, choices "A".."E")
- mmlu: mmlu/default/_default_template_yaml and the per-subject description line; few-shot from `dev`, first_n
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tinylm.eval.data import EvalDataError


@dataclass
class Doc:
    """One example in lm-eval's terms."""

    choices: list[str]  # doc_to_choice; acc_norm divides by len() of these strings
    gold: int  # index of the right choice
    text: str | None = None  # doc_to_text; None for multiple-input tasks (winogrande)
    target: str | None = None  # multiple-input tasks: the continuation every choice's context shares
    description: str = ""  # written before the few-shot examples (MMLU's subject line)
    group: str = ""  # MMLU's subject: results are reported per group too
    row: dict = field(default_factory=dict, repr=False)  # the source row: few-shot never shows a doc itself


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str  # under --data-dir
    subfolder: str | None  # the Hugging Face dataset repository's config folder, e.g. "ARC-Challenge"
    eval_split: str
    fewshot_split: str
    make_doc: Callable[[dict], Doc]
    sampler: str = "random"  # lm-eval's "default" sampler (rnd.sample); "first_n" takes the split's first k rows
    metrics: tuple[str, ...] = ("acc",)  # what lm-eval's YAML reports for the task
    original_files: dict[str, str] = field(default_factory=dict)  # split -> file name (glob) of the original release
    group_folders: bool = False  # also one config folder per group (cais/mmlu's per-subject configs)
    source: str = ""  # the Hugging Face dataset whose layout the files follow

    @property
    def primary_metric(self) -> str:
        return "acc_norm" if "acc_norm" in self.metrics else "acc"


def _check_gold(doc: Doc) -> Doc:
    if not 0 <= doc.gold < len(doc.choices):
        raise ValueError(f"answer index {doc.gold} is outside the {len(doc.choices)} choices")
    return doc


# --- hellaswag: https://github.com/EleutherAI/lm-evaluation-harness/blob/main/lm_eval/tasks/hellaswag/utils.py

def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag (lm-eval's comment)
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Doc:
    if row["label"] in ("", None):
        raise ValueError("'label' is empty (the test split is unlabeled; evaluate the validation split)")
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _check_gold(Doc(text=hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                           choices=[hellaswag_preprocess(e) for e in _strings(row["endings"], "endings")],
                           gold=int(row["label"]), row=row))


# --- ARC: lm_eval/tasks/arc/arc_easy.yaml

def _arc(row: dict) -> Doc:
    question, choices = row["question"], row.get("choices")
    if isinstance(question, dict):  # the original ARC release nests the choices in the question
        choices = {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}
        question = question["stem"]
    if choices is None:
        raise KeyError("choices")
    labels = list(choices["label"])
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return _check_gold(Doc(text=f"Question: {question}\nAnswer:", choices=_strings(choices["text"], "choices.text"),
                           gold=labels.index(row["answerKey"]), row=row))


# --- winogrande: lm_eval/tasks/winogrande/preprocess_winogrande.py

def _winogrande(row: dict) -> Doc:
    sentence = row["sentence"]
    if "_" not in sentence:
        raise ValueError("'sentence' has no blank '_'")
    answer = str(row["answer"])
    if answer not in ("1", "2"):
        raise ValueError(f"'answer' is {row['answer']!r}, expected \"1\" or \"2\"")
    blank = sentence.index("_")
    options = [row["option1"], row["option2"]]
    return Doc(choices=[sentence[:blank] + option for option in options], gold=int(answer) - 1,
               target=sentence[blank + 1:].strip(), row=row)


# --- commonsense_qa: lm_eval/tasks/commonsense_qa/default.yaml

_LETTERS = ["A", "B", "C", "D", "E"]


def _commonsense_qa(row: dict) -> Doc:
    question, choices = row["question"], row.get("choices")
    if isinstance(question, dict):  # the original release: {"stem", "choices": [{"label", "text"}]}
        choices = {"text": [c["text"] for c in question["choices"]]}
        question = question["stem"]
    texts = _strings(choices["text"], "choices.text", count=5)
    options = "".join(f"{letter}. {text}\n" for letter, text in zip(_LETTERS, texts))
    if row["answerKey"] not in _LETTERS:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of A-E")
    return Doc(text=f"Question: {question.strip()}\n{options}Answer:", choices=list(_LETTERS),
               gold=_LETTERS.index(row["answerKey"]), row=row)


# --- MMLU: lm_eval/tasks/mmlu/default/_default_template_yaml and mmlu_<subject>.yaml's description

def _mmlu(row: dict) -> Doc:
    if "columns" in row:  # the original release's CSV: question, A, B, C, D, answer; file <subject>_<split>.csv
        if len(row["columns"]) != 6:
            raise ValueError(f"expected 6 columns (question, A, B, C, D, answer), got {len(row['columns'])}")
        question, *choices, answer = row["columns"]
        row = {"question": question, "choices": choices, "answer": answer, "subject": row["file"].rsplit("_", 1)[0]}
    choices = _strings(row["choices"], "choices", count=4)
    answer = row["answer"]
    gold = _LETTERS.index(answer) if isinstance(answer, str) and answer in _LETTERS[:4] else int(answer)
    subject = row["subject"]
    if not subject:
        raise ValueError("'subject' is empty (use the 'all' configuration, whose rows name their subject)")
    options = "".join(f"{letter}. {text}\n" for letter, text in zip(_LETTERS, choices))
    description = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    return _check_gold(Doc(text=f"{row['question'].strip()}\n{options}Answer:", choices=_LETTERS[:4], gold=gold,
                           description=description, group=subject, row=row))


def _strings(value, name: str, count: int | None = None) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name!r} must be a list of strings")
    if count is not None and len(value) != count:
        raise ValueError(f"{name!r} has {len(value)} entries, expected {count}")
    return list(value)


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("hellaswag", "hellaswag", "data", "validation", "train", _hellaswag, metrics=("acc", "acc_norm"),
             original_files={"validation": "hellaswag_val.jsonl", "train": "hellaswag_train.jsonl"},
             source="Rowan/hellaswag"),
    TaskSpec("arc_easy", "ai2_arc", "ARC-Easy", "test", "train", _arc, metrics=("acc", "acc_norm"),
             original_files={"test": "ARC-Easy-Test.jsonl", "train": "ARC-Easy-Train.jsonl"}, source="allenai/ai2_arc"),
    TaskSpec("arc_challenge", "ai2_arc", "ARC-Challenge", "test", "train", _arc, metrics=("acc", "acc_norm"),
             original_files={"test": "ARC-Challenge-Test.jsonl", "train": "ARC-Challenge-Train.jsonl"},
             source="allenai/ai2_arc"),
    TaskSpec("winogrande", "winogrande", "winogrande_xl", "validation", "train", _winogrande,
             original_files={"validation": "dev.jsonl", "train": "train_xl.jsonl"}, source="allenai/winogrande"),
    TaskSpec("commonsense_qa", "commonsense_qa", "data", "validation", "train", _commonsense_qa,
             original_files={"validation": "dev_rand_split.jsonl", "train": "train_rand_split.jsonl"},
             source="tau/commonsense_qa"),
    TaskSpec("mmlu", "mmlu", "all", "test", "dev", _mmlu, sampler="first_n", source="cais/mmlu",
             original_files={"test": "test/*_test.csv", "dev": "dev/*_dev.csv"}, group_folders=True),
]}
# The QED-75M card's table, in its column order
DEFAULT_TASKS = ["arc_challenge", "commonsense_qa", "hellaswag", "winogrande", "mmlu"]


def resolve_tasks(names: str | list[str]) -> list[TaskSpec]:
    """'hellaswag,arc_easy' -> specs, in the order given; an unknown name is a one-line error."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise EvalDataError("no tasks given")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise EvalDataError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]
