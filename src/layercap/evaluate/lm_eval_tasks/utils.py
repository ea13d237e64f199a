"""``process_docs`` hooks of the local lm-evaluation-harness tasks (format-A task files).

A format-A record keeps its choices inside ``instruction`` ("Answer1: ... Answer2: ...,
Answer format: answer1/answer2"); these hooks split it with layercap's own parser so that both
evaluators read the same items. Everything after that -- the prompt template (in the YAML), the
tokenisation, the log-likelihoods and acc / acc_norm -- is lm-evaluation-harness's.
"""

from __future__ import annotations


def _split(record: dict) -> tuple[str, list[str], int]:
    from layercap.data.tasks import _parse_choices

    question, choices, keys = _parse_choices(record["instruction"])
    return question, choices, keys.index(str(record["answer"]).strip().lower())


def _map(dataset, fn):
    return dataset.map(fn, remove_columns=list(dataset.column_names))


def multiple_choice(dataset):
    """ARC / OpenBookQA: {question, choices (texts, no leading space), label}."""

    def one(record):
        question, choices, label = _split(record)
        return {"question": question, "choices": choices, "label": label}

    return _map(dataset, one)


def true_false(dataset):
    """BoolQ (question only, no passage in this data): {question without "?", label 1 = true}."""

    def one(record):
        question, _, label = _split(record)
        return {"question": question.rstrip().rstrip("?"), "label": 1 if label == 0 else 0}  # keys: true/false

    return _map(dataset, one)
