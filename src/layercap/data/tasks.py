"""Multiple-choice task files -> one representation (``Task`` of ``MCItem``).

``load_task(path)`` dispatches on the file's *content* (not its name) and understands:

* **format A** -- JSON list of ``{"instruction", "input", "output", "answer"}`` (the LLM-Adapters
  "commonsense" format). The choices are parsed out of ``instruction`` ("Answer1: ... Answer2: ...",
  "Option1: ...", "Solution1: ...", "Ending1: ..." up to "Answer format: ...", or true/false);
  ``answer`` names the right one (``answer2``, ``option1``, ``true``...).
* **format B** -- JSONL ``{"question", "choices": {"label": [...], "text": [...]}, "answerKey"}``
  (CommonsenseQA, ARC in its Hugging Face form).
* **generic JSONL** -- ``{"context": str, "choices": [str, ...], "label": int}`` per line, scored
  exactly as written (put the separating space at the start of each choice, e.g. ``" yes"``).
* **GLUE TSV** -- CoLA (``sentence<TAB>label``, with or without the ``x<TAB>y`` header, or the
  original 4-column GLUE file), RTE (``index, sentence1, sentence2, label`` with
  ``entailment``/``not_entailment``), MRPC (``Quality, #1 ID, #2 ID, #1 String, #2 String``).
* **a directory** -- its evaluation split: MRPC's GLUE dev set when the directory holds
  ``msr_paraphrase_train.txt`` + ``dev_ids.tsv`` (the 408 dev pairs), otherwise the first of
  ``EVAL_SPLITS`` that exists (``test.json``, ..., CoLA's in-domain dev ``test_idd.tsv``,
  RTE's ``dev.tsv``).

Zero-shot prompts follow lm-evaluation-harness (``context`` + ``continuation``, the continuation
starting with its separating space):

=============  ======================================================  ==========================
task           context                                                 continuations
=============  ======================================================  ==========================
ARC, generic   ``Question: {q}\\nAnswer:``                              ``" {choice}"``
OpenBookQA     ``{question_stem}``                                     ``" {choice}"``
CommonsenseQA  ``Question: {q}\\nAnswer:`` (the harness scores letters  ``" {choice}"``
               A-E after listing the options; a 135M model is at
               chance on that, so we score the answer text as for ARC)
BoolQ          ``{question}?\\nAnswer:`` (no passage in this data)      ``" no"`` / ``" yes"``
WinoGrande     partial scoring: ``{sentence before _}{option}`` per    ``" {sentence after _}"``
               choice, the *same* continuation scored for each         (shared)
CoLA           ``{s}\\nQuestion: Does this sentence make sense?\\n       ``" no"`` / ``" yes"``
               Answer:``
RTE            ``{s1}\\nQuestion: {s2} True or False?\\nAnswer:``       ``" True"`` / ``" False"``
MRPC           ``Sentence 1: {s1}\\nSentence 2: {s2}\\nQuestion: Do     ``" no"`` / ``" yes"``
               both sentences mean the same thing?\\nAnswer:``
=============  ======================================================  ==========================

WinoGrande partial scoring (as the harness): the blank ``_`` is filled with each option and only
the text after the blank is scored, so the options compete on how well they predict the rest of
the sentence; ``MCItem.choice_contexts`` holds the per-option contexts and ``continuation`` the
shared continuation (acc_norm is then the same as acc).

Fine-tuning (``Task.training_examples``): format A uses ``instruction`` (+ ``input``) as the prompt
and ``output`` as the answer; the other formats are converted to the same form (an instruction
listing the options, ``Answer format: ...``, and ``the correct answer is ...``).
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from layercap.errors import LayercapError
from layercap.io import check_number, parse_json, parse_jsonl, read_text_file, sha256_bytes, sha256_file

# Evaluation split of a task directory, first match wins (MRPC dev is special-cased).
EVAL_SPLITS = (
    "test.json",
    "test.jsonl",
    "dev.json",
    "dev.jsonl",
    "dev_rand_split.jsonl",
    "validation.jsonl",
    "test_idd.tsv",  # CoLA in-domain dev (the GLUE dev set)
    "dev.tsv",
    "test.tsv",
)

MRPC_DEV_FILES = ("msr_paraphrase_train.txt", "dev_ids.tsv")
_MARKER_WORDS = ("Answer", "Option", "Solution", "Ending")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item.

    ``context`` + ``choices[i]`` is the text whose continuation log-likelihood is scored (choices
    carry their leading space). For partial scoring (WinoGrande) ``choice_contexts[i]`` replaces
    the context of choice ``i`` and ``continuation`` is the text scored for every choice.
    ``prompt``/``answer``: the fine-tuning form of the item (instruction and expected output).
    """

    context: str
    choices: list[str]
    label: int
    choice_contexts: list[str] | None = None
    continuation: str | None = None
    prompt: str | None = None
    answer: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pair scored for each choice, in choice order."""
        if self.choice_contexts is not None:
            return [(c, self.continuation or "") for c in self.choice_contexts]
        return [(self.context, c) for c in self.choices]

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Task:
    """A multiple-choice task: ``items``, ``chance`` = expected accuracy of uniform guessing
    (mean of 1/number-of-choices), ``source`` = the file read, ``sha256`` of that file."""

    name: str
    items: list[MCItem]
    chance: float
    source: str
    sha256: str = ""
    template: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def training_examples(self) -> list[tuple[str, str]]:
        """(prompt, answer) pairs for supervised fine-tuning, one per item."""
        return [(it.prompt or "", it.answer or "") for it in self.items]


# ----------------------------------------------------------------------------------------------
# public entry point


def load_task(path: str | Path, limit: int | None = None, seed: int = 0) -> Task:
    """Read a task file or directory (see module docstring).

    ``limit``: keep a seeded random subset of ``limit`` items (in file order) -- the files are often
    sorted, so the first N items would not be representative.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise LayercapError(f"--limit must be >= 1, got {limit}.")
    if path.is_dir():
        file, name, items, template = _load_dir(path)
    elif path.exists():
        file, name = path, _task_name(path)
        items, template = _load_file(path, name)
    else:
        raise LayercapError(f"task file {str(path)!r} does not exist; pass a task JSON/JSONL/TSV file or a task directory.")
    if not items:
        raise LayercapError(f"{path}: no items found; is this a task file? (see `layercap evaluate --help`).")
    for i, it in enumerate(items):
        if not (0 <= it.label < len(it.choices)) or len(it.choices) < 2:
            raise LayercapError(f"{path}: item {i} has label {it.label} for {len(it.choices)} choices; fix the file.")
    if limit is not None and limit < len(items):
        items = [items[i] for i in subset_indices(len(items), limit, seed)]
    chance = sum(1.0 / len(it.choices) for it in items) / len(items)
    digest = sha256_file(file) if file else sha256_bytes(b"".join((path / f).read_bytes() for f in MRPC_DEV_FILES))
    return Task(name, items, chance, str(path), digest, template)


def subset_indices(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """Indices (ascending) of the seeded ``limit``-item subset of ``n`` items that ``load_task`` keeps."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


# ----------------------------------------------------------------------------------------------
# dispatch


def _task_name(path: Path) -> str:
    generic = {"test", "train", "dev", "validation", "dev_rand_split", "test_idd", "test_ood", "msr_paraphrase_train"}
    return path.parent.name if path.stem.lower() in generic else path.stem


def _load_dir(path: Path):
    if all((path / f).is_file() for f in MRPC_DEV_FILES):
        return None, path.name, _mrpc_dev(path), "mrpc"
    for split in EVAL_SPLITS:
        f = path / split
        if f.is_file():
            items, template = _load_file(f, path.name)
            return f, path.name, items, template
    raise LayercapError(f"task directory {path} has none of {', '.join(EVAL_SPLITS)}; pass the task file itself.")


def _load_file(path: Path, name: str) -> tuple[list[MCItem], str]:
    raw = read_text_file(path, "task file", "Pass a UTF-8 task JSON/JSONL/TSV file or a task directory.")
    head = raw.lstrip()[:1]
    if head == "[" or (head == "{" and _is_one_json_document(raw)):
        doc = parse_json(raw, path, "task file")
        if isinstance(doc, dict):
            raise LayercapError(f"{path}: one JSON object, not a task file; expected a JSON list of records (format A) "
                                "or JSON lines (one object per line).")
        if not isinstance(doc, list):
            raise LayercapError(f"{path}: expected a JSON list of task records, got {type(doc).__name__}.")
        if doc and all(isinstance(r, dict) and "context" in r for r in doc):
            return [_generic(r, path, i) for i, r in enumerate(doc)], "generic"
        return _format_a(doc, path, name)
    if head == "{":
        records = parse_jsonl(raw, path)
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise LayercapError(f"{path}: line {bad + 1} is not a JSON object; expected one task record per line.")
        if all("context" in r for r in records):
            return [_generic(r, path, i) for i, r in enumerate(records)], "generic"
        if all("question" in r and "choices" in r for r in records):
            return [_format_b(r, path, i, name) for i, r in enumerate(records)], "format-b"
        raise LayercapError(
            f"{path}: JSON lines are neither format B ({{question, choices, answerKey}}) nor generic "
            '({"context", "choices", "label"}).'
        )
    return _load_tsv(path, raw)


def _is_one_json_document(raw: str) -> bool:
    """True when a text starting with '{' is one JSON document spread over several lines (not
    JSON lines, whose every line is a whole object)."""
    if len([line for line in raw.splitlines() if line.strip()]) < 2:
        return False
    try:
        json.loads(raw)
    except json.JSONDecodeError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# format A


def _parse_choices(instruction: str) -> tuple[str, list[str], list[str]]:
    """(question, choice texts, answer keys) of a format-A instruction."""
    fmt_at = instruction.rfind("Answer format:")
    if fmt_at < 0:
        raise ValueError("no 'Answer format:' line")
    keys = [k.strip().lower() for k in instruction[fmt_at + len("Answer format:") :].strip().split("/")]
    body = instruction[:fmt_at]
    m = re.fullmatch(r"([a-z]+)(\d+)", keys[0])
    if m and m.group(1).capitalize() in _MARKER_WORDS:
        word = m.group(1).capitalize()
        starts = []
        for i in range(1, len(keys) + 1):
            at = body.find(f"{word}{i}:", starts[-1][1] if starts else 0)
            if at < 0:
                raise ValueError(f"missing {word}{i}:")
            starts.append((at, at + len(f"{word}{i}:")))
        choices = [body[s[1] : (starts[j + 1][0] if j + 1 < len(starts) else len(body))].strip() for j, s in enumerate(starts)]
        question = body[: starts[0][0]].strip()
    else:  # true/false (BoolQ) or other named keys
        choices, question = list(keys), body.strip()
    if question.startswith("Please ") and ": " in question:
        question = question.split(": ", 1)[1]
    return question, choices, keys


def _format_a(doc, path: Path, name: str) -> tuple[list[MCItem], str]:
    items, template = [], "arc"
    for i, r in enumerate(doc):
        if not isinstance(r, dict) or "instruction" not in r or "answer" not in r:
            raise LayercapError(f"{path}: record {i} lacks 'instruction'/'answer'; expected format A (see data README).")
        if not isinstance(r["instruction"], str) or not isinstance(r.get("input") or "", str) or not isinstance(r.get("output") or "", str):
            raise LayercapError(f"{path}: record {i}: 'instruction', 'input' and 'output' must be strings.")
        try:
            question, choices, keys = _parse_choices(r["instruction"])
        except ValueError as exc:
            raise LayercapError(f"{path}: record {i}: cannot parse the choices out of 'instruction' ({exc}).") from exc
        answer = str(r["answer"]).strip().lower()
        if answer not in keys:
            raise LayercapError(f"{path}: record {i}: answer {r['answer']!r} is not one of {keys}.")
        label = keys.index(answer)
        extra = (r.get("input") or "").strip()
        prompt = r["instruction"] + (f"\n\n{extra}" if extra else "")
        output = r.get("output") or f"the correct answer is {r['answer']}"
        if keys == ["true", "false"]:
            template = "boolq"
            q = question.rstrip().rstrip("?")
            item = MCItem(f"{q}?\nAnswer:", [" no", " yes"], 1 if answer == "true" else 0, prompt=prompt, answer=output)
        elif "_" in question and "fill in the blank" in r["instruction"]:
            template = "winogrande"
            item = _winogrande(question, choices, label, prompt, output)
        elif "openbookqa" in name.lower():
            template = "openbookqa"
            item = MCItem(question, [f" {c}" for c in choices], label, prompt=prompt, answer=output)
        else:
            item = MCItem(f"Question: {question}\nAnswer:", [f" {c}" for c in choices], label, prompt=prompt, answer=output)
        items.append(item)
    return items, template


def _winogrande(sentence: str, options: list[str], label: int, prompt: str, output: str) -> MCItem:
    # Harness partial scoring: context = text before the blank + option, continuation = the rest.
    at = sentence.index("_")
    before, after = sentence[:at], sentence[at + 1 :].strip()
    return MCItem(
        before,
        [f" {o}" for o in options],
        label,
        choice_contexts=[before + o for o in options],
        continuation=f" {after}",
        prompt=prompt,
        answer=output,
    )


# ----------------------------------------------------------------------------------------------
# format B and generic


def _instruction(question: str, choices: list[str]) -> tuple[str, list[str]]:
    """A format-A style instruction listing the options, and the answer keys."""
    keys = [f"answer{i}" for i in range(1, len(choices) + 1)]
    opts = " ".join(f"Answer{i}: {c}" for i, c in enumerate(choices, start=1))
    return (
        f"Please choose the correct answer to the question: {question}\n\n{opts}\n\nAnswer format: {'/'.join(keys)}",
        keys,
    )


def _format_b(r: dict, path: Path, i: int, name: str) -> MCItem:
    ch = r["choices"]
    texts_ok = isinstance(ch, list) or (isinstance(ch, dict) and isinstance(ch.get("text", []), list)
                                        and isinstance(ch.get("label", []), list))
    question_ok = isinstance(r["question"], str) or (isinstance(r["question"], dict) and isinstance(r["question"].get("stem"), str))
    if not texts_ok or not question_ok:
        raise LayercapError(f"{path}: line {i + 1}: expected 'question' (str or {{stem}}) and 'choices' "
                            "({label: [...], text: [...]} or a list); fix the record.")
    texts = list(ch.get("text", [])) if isinstance(ch, dict) else list(ch)
    labels = list(ch.get("label", [])) if isinstance(ch, dict) else [chr(65 + j) for j in range(len(texts))]
    key = str(r.get("answerKey", ""))
    if key not in labels:
        raise LayercapError(f"{path}: line {i + 1}: answerKey {key!r} is not one of {labels}.")
    label = labels.index(key)
    question = r["question"]["stem"] if isinstance(r["question"], dict) else str(r["question"])
    prompt, keys = _instruction(question.strip(), texts)
    return MCItem(
        f"Question: {question.strip()}\nAnswer:",
        [f" {t}" for t in texts],
        label,
        prompt=prompt,
        answer=f"the correct answer is {keys[label]}",
    )


def _generic(r: dict, path: Path, i: int) -> MCItem:
    need = "need 'context' (str), 'choices' (list of str) and 'label' (int)"
    missing = [k for k in ("context", "choices", "label") if k not in r]
    if missing:
        raise LayercapError(f"{path}: record {i + 1}: no {', '.join(repr(m) for m in missing)}; {need}.")
    if not isinstance(r["context"], str) or not isinstance(r["choices"], list) or not all(isinstance(c, str) for c in r["choices"]):
        raise LayercapError(f"{path}: record {i + 1}: {need}; got context {type(r['context']).__name__}, "
                            f"choices {type(r['choices']).__name__}.")
    context, choices = r["context"], list(r["choices"])
    label = check_number(r["label"], "label", f"{path}: record {i + 1}", integer=True, minimum=0)
    prompt, keys = _instruction(context.strip(), [c.strip() for c in choices])
    return MCItem(context, choices, label, prompt=prompt, answer=f"the correct answer is {keys[label]}" if 0 <= label < len(keys) else "")


# ----------------------------------------------------------------------------------------------
# GLUE TSV


def _rows(raw: str) -> list[list[str]]:
    # MRPC/RTE text contains quotes that must not be interpreted as CSV quoting.
    return [row for row in csv.reader(io.StringIO(raw), delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _two_way(context: str, choices: list[str], label: int, question: str, words: list[str]) -> MCItem:
    prompt = f"{question}\n\nAnswer format: {'/'.join(words)}"
    return MCItem(context, choices, label, prompt=prompt, answer=f"the correct answer is {words[label]}")


def _cola(sentence: str, label: int) -> MCItem:
    return _two_way(
        f"{sentence}\nQuestion: Does this sentence make sense?\nAnswer:",
        [" no", " yes"],
        label,
        f"Please determine whether the following sentence is grammatically acceptable: {sentence}",
        ["no", "yes"],
    )


def _rte(s1: str, s2: str, label: int) -> MCItem:
    return _two_way(
        f"{s1}\nQuestion: {s2} True or False?\nAnswer:",
        [" True", " False"],
        label,
        f"Please determine whether the hypothesis follows from the premise. Premise: {s1} Hypothesis: {s2}",
        ["true", "false"],
    )


def _mrpc(s1: str, s2: str, label: int) -> MCItem:
    return _two_way(
        f"Sentence 1: {s1}\nSentence 2: {s2}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
        [" no", " yes"],
        label,
        f"Please determine whether the two sentences mean the same thing. Sentence 1: {s1} Sentence 2: {s2}",
        ["no", "yes"],
    )


def _load_tsv(path: Path, raw: str) -> tuple[list[MCItem], str]:
    rows = _rows(raw)
    if not rows:
        return [], ""
    header = [c.strip().lower() for c in rows[0]]
    try:
        if header[:4] == ["index", "sentence1", "sentence2", "label"]:
            names = {"entailment": 0, "not_entailment": 1}
            return [_rte(r[1], r[2], names[r[3].strip()]) for r in rows[1:]], "rte"
        if header[:1] == ["quality"] and len(header) >= 5:
            return [_mrpc(r[3], r[4], int(r[0])) for r in rows[1:]], "mrpc"
        if header == ["sentence id", "string", "author", "url", "agency", "date", "web date"]:
            raise LayercapError(f"{path} is MRPC's sentence table, not a task; pass the mrpc directory (GLUE dev) or train.tsv.")
        body = rows[1:] if header == ["x", "y"] or header[-1:] == ["label"] else rows
        if all(len(r) == 2 for r in body):
            return [_cola(r[0], int(r[1])) for r in body], "cola"
        if all(len(r) == 4 and r[1] in ("0", "1") for r in body):  # original GLUE CoLA: source, label, *, sentence
            return [_cola(r[3], int(r[1])) for r in body], "cola"
    except (KeyError, ValueError, IndexError) as exc:
        raise LayercapError(f"{path}: malformed row for its TSV layout ({exc!r}); fix or re-export the file.") from exc
    raise LayercapError(
        f"{path}: unrecognised TSV layout (header {rows[0][:5]}); expected CoLA (sentence, label), "
        "RTE (index, sentence1, sentence2, label) or MRPC (Quality, #1 ID, #2 ID, #1 String, #2 String)."
    )


def _mrpc_dev(path: Path) -> list[MCItem]:
    """GLUE MRPC dev: the rows of msr_paraphrase_train.txt whose (id1, id2) are in dev_ids.tsv."""
    ids = [tuple(r[:2]) for r in _rows(read_text_file(path / "dev_ids.tsv", "MRPC dev ids"))]
    table = {(r[1], r[2]): r for r in _rows(read_text_file(path / "msr_paraphrase_train.txt", "MRPC sentence pairs"))[1:]}
    missing = [i for i in ids if i not in table]
    if missing:
        raise LayercapError(f"{path}: {len(missing)} dev id pairs (e.g. {missing[0]}) are not in msr_paraphrase_train.txt.")
    return [_mrpc(table[i][3], table[i][4], int(table[i][0])) for i in ids]
