"""Prompts, continuations and few-shot contexts of every task, against strings written by hand from
lm-evaluation-harness's task definitions; reading the published file layouts; one-line data errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tinylm.eval.data import EvalDataError, read_documents
from tinylm.eval.loading import load_groups
from tinylm.eval.prompts import Request, build_requests
from tinylm.eval.tasks import TASKS, hellaswag_preprocess, resolve_tasks

DATA = Path(__file__).parents[1] / "data" / "eval"


def requests(task: str, k: int, data_dir: Path = DATA) -> dict[str, list[list[Request]]]:
    spec = TASKS[task]
    return {g.name: build_requests(spec, g, k) for g in load_groups(data_dir, spec, k)}


def contexts(reqs: list[Request]) -> list[str]:
    return [r.context for r in reqs]


def continuations(reqs: list[Request]) -> list[str]:
    return [r.continuation for r in reqs]


def test_hellaswag_preprocess_and_two_shot_context():
    # random.Random(1234).sample(train, 2) draws train[1], then train[0] for the first doc (lm-eval's default sampler)
    doc0 = requests("hellaswag", 2)[""][0]
    assert set(contexts(doc0)) == {
        "Making a sandwich: A person lays two slices of bread on a board. They spread butter on the bread and add "
        "cheese.\n\n"
        "Brushing teeth: A boy holds a toothbrush over the sink. He squeezes toothpaste onto the brush and brushes "
        "his teeth.\n\n"
        # ctx_b.capitalize() also lowercases the rest: "Hot water" -> "hot water"
        "Washing dishes: A woman stands at a kitchen sink full of plates. She turns on the hot water and"}
    assert continuations(doc0) == [" throws the plates.", " sings to the cat on the table.",
                                   " scrubs each plate with a soapy sponge before rinsing it.", " leaves."]


def test_hellaswag_wikihow_bracket_cleanup():
    doc3 = requests("hellaswag", 0)[""][3]
    assert set(contexts(doc3)) == {"Home and Garden: How to water a houseplant. Check the soil first. Push a finger "
                                   "into the soil up to the first knuckle. If the soil feels dry"}
    # strip() runs before the brackets go, so an ending that starts with "[title]" keeps a leading space
    assert continuations(doc3) == [" paint the pot. Use red.",
                                   " it is time to water the plant. Pour slowly until water runs out of the drainage "
                                   "holes.", " throw the plant away.", "  Sing to it. Plants like songs."]
    # one replace("  ", " ") pass: the three spaces left around "[x]" become two, as in lm-eval
    assert hellaswag_preprocess(" a [title] b [x]  c ") == "a. b  c"


def test_arc_question_answer_format_with_one_shot():
    # Random(1234).sample(train, 1) -> train[1] for the first doc; the few-shot target is the gold choice's text
    doc0 = requests("arc_challenge", 1)[""][0]
    assert set(contexts(doc0)) == {"Question: What force pulls objects toward the center of Earth?\nAnswer: gravity"
                                   "\n\nQuestion: Which tool is best for measuring the mass of a rock?\nAnswer:"}
    assert continuations(doc0) == [" a balance", " a thermometer", " a meter stick", " a graduated cylinder"]


def test_arc_numeric_labels_pick_the_gold_by_label():
    spec = TASKS["arc_challenge"]
    doc = load_groups(DATA, spec, 0)[0].docs[2]
    assert doc.gold == 2 and doc.choices[doc.gold] == "ice"  # answerKey "3" among labels "1".."4"


def test_winogrande_partial_scoring_and_one_shot():
    # Multiple inputs: one context per option (the sentence up to the blank + the option); the shared continuation
    # is what follows the blank. The few-shot example is the gold option's context, " ", and the continuation.
    doc0 = requests("winogrande", 1)[""][0]
    shot = "The ice melted faster than the stone because the ice was warmer than zero.\n\n"
    assert contexts(doc0) == [shot + "The trophy did not fit in the suitcase because the trophy made of gold",
                              shot + "The trophy did not fit in the suitcase because the suitcase"]
    assert continuations(doc0) == [" was too big.", " was too big."]
    doc1 = requests("winogrande", 0)[""][1]
    assert contexts(doc1) == ["Maria lent her umbrella to Sarah because Maria herself",
                              "Maria lent her umbrella to Sarah because Sarah"]
    assert continuations(doc1) == [" was going out in the rain."] * 2


def test_commonsense_qa_lettered_options():
    doc0 = requests("commonsense_qa", 1)[""][0]
    assert set(contexts(doc0)) == {
        "Question: What do you use to see?\nA. ears\nB. nose\nC. feet\nD. eyes\nE. elbows\nAnswer: D\n\n"
        "Question: Where would you put a letter so that it gets delivered?\nA. mailbox\nB. refrigerator\nC. bathtub"
        "\nD. oven\nE. garden\nAnswer:"}
    assert continuations(doc0) == [" A", " B", " C", " D", " E"]
    doc2 = requests("commonsense_qa", 0)[""][2]  # question.strip()
    assert doc2[0].context.startswith("Question: What can you use to cut paper?\nA. scissors\n")


def test_mmlu_description_subjects_and_first_n_shots():
    groups = requests("mmlu", 2)
    assert list(groups) == ["astronomy", "elementary_mathematics"]  # one group per subject, as lm-eval's subtasks
    assert set(contexts(groups["astronomy"][0])) == {
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "What is the largest planet in the Solar System?\nA. Earth\nB. Mars\nC. Jupiter\nD. Mercury\nAnswer: C\n\n"
        "What does the Moon orbit?\nA. Earth\nB. Mars\nC. the Sun only\nD. Venus\nAnswer: A\n\n"
        "Which planet is known as the Red Planet?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn\nAnswer:"}
    assert continuations(groups["astronomy"][0]) == [" A", " B", " C", " D"]
    zero = requests("mmlu", 0)["elementary_mathematics"][0]
    assert zero[0].context == ("The following are multiple choice questions (with answers) about elementary "
                               "mathematics.\n\nWhat is 2 + 3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:")


def test_fewshot_draws_follow_one_seeded_generator_per_task():
    """lm-eval draws with one Random(1234) in doc order, so doc 1's shots depend on doc 0's draw too."""
    shots = [r[0].context.split("\n\n")[:2] for r in requests("hellaswag", 2)[""]]
    # Random(1234).sample(range(3), 2) four times: [1, 0], [0, 2], [2, 0], [2, 0]
    firsts = [s[0].split(":")[0] for s in shots]
    assert firsts == ["Making a sandwich", "Brushing teeth", "Walking the dog", "Walking the dog"]
    group = load_groups(DATA, TASKS["hellaswag"], 2)[0]
    other_seed = build_requests(TASKS["hellaswag"], group, 2, seed=7)
    assert [r[0].context for r in other_seed] != [r[0].context for r in requests("hellaswag", 2)[""]]


def test_limit_keeps_the_first_docs_and_their_shots():
    spec = TASKS["hellaswag"]
    group = load_groups(DATA, spec, 2)[0]
    assert build_requests(spec, group, 2, limit=2) == build_requests(spec, group, 2)[:2]


def test_parquet_shards_in_the_hugging_face_layout_read_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for task, folder in [("arc_challenge", "ai2_arc/ARC-Challenge"), ("hellaswag", "hellaswag")]:
        for split in ("test", "train") if task.startswith("arc") else ("validation", "train"):
            rows = [json.loads(line) for line in (DATA / folder / f"{split}.jsonl").read_text().splitlines()]
            target = tmp_path / folder / ("data" if task == "hellaswag" else "") / f"{split}-00000-of-00001.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), target)
        assert requests(task, 1, tmp_path) == requests(task, 1)


def test_original_winogrande_file_names_are_found(tmp_path):
    shutil.copytree(DATA / "winogrande", tmp_path / "winogrande")
    assert (tmp_path / "winogrande" / "dev.jsonl").is_file()
    assert len(requests("winogrande", 1, tmp_path)[""]) == 3


def _original_layout(task: str, row: dict) -> dict:
    """The same row in the original release's layout (nested question, int label)."""
    if task.startswith("arc"):
        choices = [{"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"])]
        return {"id": row["id"], "question": {"stem": row["question"], "choices": choices}, "answerKey": row["answerKey"]}
    if task == "commonsense_qa":
        choices = [{"label": lab, "text": t} for lab, t in zip(row["choices"]["label"], row["choices"]["text"])]
        return {"answerKey": row["answerKey"], "id": row["id"],
                "question": {"question_concept": row["question_concept"], "choices": choices, "stem": row["question"]}}
    return {**row, "label": int(row["label"])}  # hellaswag_val.jsonl has integer labels


@pytest.mark.parametrize("task, folder, names", [
    ("arc_easy", "ai2_arc", {"test": "ARC-Easy-Test.jsonl", "train": "ARC-Easy-Train.jsonl"}),
    ("commonsense_qa", "commonsense_qa", {"validation": "dev_rand_split.jsonl", "train": "train_rand_split.jsonl"}),
    ("hellaswag", "hellaswag", {"validation": "hellaswag_val.jsonl", "train": "hellaswag_train.jsonl"}),
])
def test_original_release_files_read_like_the_hugging_face_layout(tmp_path, task, folder, names):
    spec = TASKS[task]
    source = DATA / folder / (spec.subfolder if task.startswith("arc") else "")
    (tmp_path / folder).mkdir()
    for split, name in names.items():
        rows = [json.loads(line) for line in (source / f"{split}.jsonl").read_text().splitlines()]
        lines = [json.dumps(_original_layout(task, row)) for row in rows]
        (tmp_path / folder / name).write_text("\n".join(lines) + "\n")
    assert requests(task, 1, tmp_path) == requests(task, 1)


def test_unknown_task_is_named():
    with pytest.raises(EvalDataError, match="unknown task 'hellaswagg'"):
        resolve_tasks("arc_easy,hellaswagg")


def test_missing_split_names_the_expected_file(tmp_path):
    with pytest.raises(EvalDataError, match=r"arc_easy: no test split found: expected .*ai2_arc/ARC-Easy/test.parquet"):
        load_groups(tmp_path, TASKS["arc_easy"], 0)


@pytest.mark.parametrize("line, message", [
    ('{"sentence": "No blank here.", "option1": "a", "option2": "b", "answer": "1"}', "has no blank"),
    ('{"sentence": "A _ b.", "option1": "a", "answer": "1"}', "missing field 'option2'"),
    ('{"sentence": "A _ b.", "option1": "a", "option2": "b", "answer": "3"}', "expected \"1\" or \"2\""),
    ('{"sentence": "A _ b.", "option1": "a"', "not valid JSON"),
])
def test_malformed_rows_name_file_and_row(tmp_path, line, message):
    folder = tmp_path / "winogrande"
    folder.mkdir()
    good = (DATA / "winogrande" / "dev.jsonl").read_text().splitlines()[0]
    (folder / "validation.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(EvalDataError, match=message) as info:
        load_groups(tmp_path, TASKS["winogrande"], 0)
    assert "validation.jsonl" in str(info.value) and ("row 2" in str(info.value) or "line 2" in str(info.value))


def test_fewshot_larger_than_the_pool_is_a_clear_error():
    with pytest.raises(EvalDataError, match="3-shot needs 3 dev examples for astronomy, found 2"):
        load_groups(DATA, TASKS["mmlu"], 3)


def test_perplexity_documents_from_text_jsonl_and_missing_field(tmp_path):
    (tmp_path / "a.txt").write_text("one whole document\nwith two lines")
    assert read_documents(tmp_path / "a.txt") == ["one whole document\nwith two lines"]
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n{"body": "second"}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n\n{"body": "y"}\n')
    assert read_documents(tmp_path / "c.jsonl", "body") == ["x", "y"]
    with pytest.raises(EvalDataError, match=r"b.jsonl: row 2 has no 'text' field"):
        read_documents(tmp_path / "b.jsonl")
    with pytest.raises(EvalDataError, match="no such file"):
        read_documents(tmp_path / "missing.txt")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "row one"}, {"text": "row two"}]), tmp_path / "d.parquet")
    assert read_documents(tmp_path / "d.parquet") == ["row one", "row two"]
    (tmp_path / "e.parquet").write_bytes(b"not parquet")
    with pytest.raises(EvalDataError, match="e.parquet: not a readable parquet file"):
        read_documents(tmp_path / "e.parquet")


def _mmlu_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / "mmlu" / f"{split}.jsonl").read_text().splitlines() if line]


def _same_requests(data_dir: Path) -> None:
    theirs, ours = requests("mmlu", 2, data_dir), requests("mmlu", 2)
    assert theirs.keys() == ours.keys() == {"astronomy", "elementary_mathematics"}
    for subject in ours:
        for a, b in zip(theirs[subject], ours[subject], strict=True):
            assert contexts(a) == contexts(b) and continuations(a) == continuations(b)


def test_mmlu_original_csv_release_reads_as_the_hub_layout(tmp_path):
    """Hendrycks' data.tar layout: test/<subject>_test.csv and dev/<subject>_dev.csv, no header, answer letters."""
    import csv

    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        by_subject: dict[str, list[list[str]]] = {}
        for row in _mmlu_rows(split):
            by_subject.setdefault(row["subject"], []).append([row["question"], *row["choices"], "ABCD"[row["answer"]]])
        for subject, rows in by_subject.items():
            with open(tmp_path / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as handle:
                csv.writer(handle).writerows(rows)
    _same_requests(tmp_path)


def test_mmlu_per_subject_folders_read_as_the_all_config(tmp_path):
    """cais/mmlu's per-subject configs: DIR/mmlu/<subject>/test-*.parquet (here JSONL), no "all" folder."""
    for split in ("test", "dev"):
        for row in _mmlu_rows(split):
            folder = tmp_path / "mmlu" / row["subject"]
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{split}-00000-of-00001.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
    _same_requests(tmp_path)


def test_mmlu_csv_with_a_wrong_column_count_is_one_error(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "astronomy_test.csv").write_text("question,A,B,C\n")
    with pytest.raises(EvalDataError, match="astronomy_test.csv: row 1: .*6 columns"):
        load_groups(tmp_path, TASKS["mmlu"], 0)
