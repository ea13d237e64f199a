"""Task parsing: every shipped task file, hand-checked items, generic formats, bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from layercap.data.tasks import MCItem, load_task
from layercap.errors import LayercapError

# (path under tasks/, expected items, number of choices per item (set), template)
SHIPPED = [
    ("ARC-Easy/test.json", 2376, {3, 4, 5}, "arc"),
    ("ARC-Easy/train.json", 2251, {3, 4, 5}, "arc"),
    ("ARC-Challenge/test.json", 1172, {3, 4, 5}, "arc"),
    ("ARC-Challenge/train.json", 1119, {3, 4, 5}, "arc"),
    ("boolq/test.json", 3270, {2}, "boolq"),
    ("boolq/train.json", 9427, {2}, "boolq"),
    ("openbookqa/test.json", 500, {4}, "openbookqa"),
    ("openbookqa/train.json", 4957, {4}, "openbookqa"),
    ("winogrande/test.json", 1267, {2}, "winogrande"),
    ("commonsenseqa/dev_rand_split.jsonl", 1221, {5}, "format-b"),
    ("cola/train.tsv", 8551, {2}, "cola"),
    ("cola/test_idd.tsv", 527, {2}, "cola"),
    ("cola/dev.tsv", 516, {2}, "cola"),
    ("mrpc/train.tsv", 3668, {2}, "mrpc"),
    ("mrpc", 408, {2}, "mrpc"),  # GLUE dev from msr_paraphrase_train.txt + dev_ids.tsv
    ("rte/train.tsv", 1244, {2}, "rte"),
    ("rte/dev.tsv", 139, {2}, "rte"),
    ("rte/test.tsv", 1384, {2}, "rte"),
]


@pytest.mark.parametrize("rel,count,nchoices,template", SHIPPED)
def test_every_shipped_file(shared_data, rel, count, nchoices, template):
    task = load_task(shared_data / "tasks" / rel)
    assert len(task) == count
    assert task.template == template
    assert {len(it.choices) for it in task.items} <= nchoices
    assert all(0 <= it.label < len(it.choices) for it in task.items)
    assert all(len(it.requests()) == len(it.choices) for it in task.items)
    # every continuation starts with its separating space (harness target delimiter)
    assert all(cont.startswith(" ") for it in task.items for _, cont in it.requests())
    labels = Counter(it.label for it in task.items)
    assert len(labels) >= 2  # both classes / several answer positions occur
    assert len(task.sha256) == 64
    ex = task.training_examples()
    assert len(ex) == count and all(p and a.startswith("the correct answer is ") for p, a in ex)


def test_arc_hand_checked(shared_data):
    task = load_task(shared_data / "tasks" / "ARC-Easy" / "test.json")
    it = task.items[1]
    assert it.context == "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory system?\nAnswer:"
    assert it.choices == [" safety goggles", " breathing mask", " rubber gloves", " lead apron"]
    assert it.label == 1
    assert task.name == "ARC-Easy" and abs(task.chance - 0.25) < 0.01
    prompt, answer = task.training_examples()[1]
    assert prompt.startswith("Please choose the correct answer to the question: Which piece")
    assert answer == "the correct answer is answer2"
    # the 5-choice item parses to 5 choices with label 4 when the answer is answer5
    raw = json.loads((shared_data / "tasks" / "ARC-Easy" / "test.json").read_text())
    i5 = next(i for i, r in enumerate(raw) if r["answer"] == "answer5")
    assert len(task.items[i5].choices) == 5 and task.items[i5].label == 4


def test_boolq_winogrande_hand_checked(shared_data):
    boolq = load_task(shared_data / "tasks" / "boolq" / "test.json")
    assert boolq.items[0].context == "does ethanol take more energy make that produces?\nAnswer:"
    assert boolq.items[0].choices == [" no", " yes"] and boolq.items[0].label == 0  # answer: false
    assert boolq.items[1].label == 1  # "is house tax and property tax are same?" -> true
    wino = load_task(shared_data / "tasks" / "winogrande" / "test.json")
    it = wino.items[0]
    assert it.requests() == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert it.label == 1  # option2
    assert wino.items[1].label == 0


def test_glue_hand_checked(shared_data):
    rte = load_task(shared_data / "tasks" / "rte" / "test.tsv")
    assert rte.items[0].context == "No Weapons of Mass Destruction Found in Iraq Yet.\nQuestion: Weapons of Mass Destruction Found in Iraq. True or False?\nAnswer:"
    assert rte.items[0].label == 1 and rte.items[1].label == 0  # not_entailment, entailment
    cola = load_task(shared_data / "tasks" / "cola" / "test_idd.tsv")  # `x\ty` header skipped
    assert cola.items[0].context.startswith("the sailors rode the breeze clear of the rocks\n")
    assert Counter(it.label for it in cola.items) == {1: 365, 0: 162}
    mrpc_dev = load_task(shared_data / "tasks" / "mrpc")
    assert mrpc_dev.items[0].context.startswith("Sentence 1: Bush also hoped to polish his anti-AIDS credentials")
    assert Counter(it.label for it in mrpc_dev.items) == {1: 279, 0: 129}  # GLUE MRPC dev class balance
    # dev and train are disjoint and together make msr_paraphrase_train.txt
    train = load_task(shared_data / "tasks" / "mrpc" / "train.tsv")
    assert not {it.context for it in mrpc_dev.items} & {it.context for it in train.items}
    with pytest.raises(LayercapError, match="sentence table"):
        load_task(shared_data / "tasks" / "mrpc" / "msr_paraphrase_data.txt")


def test_commonsenseqa_hand_checked(shared_data):
    task = load_task(shared_data / "tasks" / "commonsenseqa")
    it = task.items[0]
    assert it.choices == [" bank", " library", " department store", " mall", " new york"] and it.label == 0
    assert task.chance == pytest.approx(0.2)
    prompt, answer = task.training_examples()[0]
    assert "Answer5: new york" in prompt and answer == "the correct answer is answer1"


def test_limit_is_seeded_subset(shared_data):
    path = shared_data / "tasks" / "openbookqa" / "test.json"
    full = load_task(path)
    a, b, c = load_task(path, limit=50, seed=0), load_task(path, limit=50, seed=0), load_task(path, limit=50, seed=1)
    assert len(a) == 50 and a.items == b.items and a.items != c.items
    positions = [full.items.index(it) for it in a.items]
    assert positions == sorted(positions)  # file order kept


def test_generic_jsonl_and_json(tmp_path):
    recs = [{"context": "2+2=", "choices": [" 4", " 5"], "label": 0}, {"context": "sky is", "choices": [" blue", " red", " green"], "label": 0}]
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    task = load_task(f)
    assert task.name == "mine" and task.items[0] == MCItem("2+2=", [" 4", " 5"], 0, prompt=task.items[0].prompt, answer="the correct answer is answer1")
    assert task.chance == pytest.approx((1 / 2 + 1 / 3) / 2)
    g = tmp_path / "mine.json"
    g.write_text(json.dumps(recs))
    assert [it.requests() for it in load_task(g).items] == [it.requests() for it in task.items]


def test_format_a_option_and_solution_markers(tmp_path):
    recs = [
        {"instruction": "Please choose the correct solution to the question: open a jar\n\nSolution1: twist the lid\n\nSolution2: eat the lid\n\nAnswer format: solution1/solution2", "input": "", "output": "the correct answer is solution1", "answer": "solution1"},
    ]
    f = tmp_path / "piqa.json"
    f.write_text(json.dumps(recs))
    it = load_task(f).items[0]
    assert it.context == "Question: open a jar\nAnswer:" and it.choices == [" twist the lid", " eat the lid"] and it.label == 0


@pytest.mark.parametrize(
    "content,match",
    [
        ('[{"instruction": "no choices here", "answer": "answer1"}]', "cannot parse"),
        ('[{"instruction": "Q\\n\\nAnswer1: a Answer2: b\\n\\nAnswer format: answer1/answer2", "answer": "answer3"}]', "not one of"),
        ('{"context": "a", "choices": [" b", " c"], "label": 5}\n', "label 5"),
        ("a\tb\tc\n", "unrecognised TSV"),
        ('{"foo": 1}\n', "neither format B"),
    ],
)
def test_bad_input(tmp_path, content, match):
    f = tmp_path / ("bad.json" if content.startswith("[") else "bad.jsonl" if content.startswith("{") else "bad.tsv")
    f.write_text(content)
    with pytest.raises(LayercapError, match=match):
        load_task(f)


def test_missing_path_and_bad_limit(tmp_path):
    with pytest.raises(LayercapError, match="does not exist"):
        load_task(tmp_path / "nope.json")
    with pytest.raises(LayercapError, match="has none of"):
        load_task(tmp_path)
    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "a", "choices": [" b", " c"], "label": 1}\n')
    with pytest.raises(LayercapError, match="--limit"):
        load_task(f, limit=0)
