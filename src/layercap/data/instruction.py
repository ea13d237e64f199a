"""The instruction (Alpaca) template that LoRA fine-tuning papers (LLM-Adapters, MoLA) use.

    Below is an instruction that describes a task. Write a response that appropriately
    completes the request.\\n\\n### Instruction:\\n{prompt}\\n\\n### Response:\\n{answer}<eos>

- :func:`render_prompt`: the template around a prompt;
- :func:`encode_example`: token ids and labels (-100 on the prompt) of one training example;
- :func:`instruction_task`: a multiple-choice task re-expressed in the trained format, for
  scoring the choices "the correct answer is answer1" .. "answerN" (or true/false).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from layercap.data.bos import NO_BOS, BosChoice, put_bos
from layercap.errors import LayercapError

TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


def render_prompt(prompt: str) -> str:
    return TEMPLATE.format(prompt=prompt)


def encode_example(tokenizer, prompt: str, answer: str, max_length: int, bos: BosChoice = NO_BOS) -> dict[str, list[int]]:
    """Token ids of [BOS] + rendered prompt + answer + eos and labels (-100 on the prompt and BOS).

    A long example keeps its answer and loses prompt tokens from the left; the BOS (when
    ``bos.add``) stays first, as the model always sees it."""
    p = tokenizer(render_prompt(prompt), add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    head = [bos.token_id] if bos.add else []
    a = a[: max_length - 1 - len(head) - len(eos)] + eos  # at least one prompt token stays as context
    p = head + p[-(max_length - len(head) - len(a)):]  # keep the answer; drop prompt tokens from the left
    return {"input_ids": p + a, "labels": [-100] * len(p) + a}


_KEY = re.compile(r"([a-z]+)(\d+)")


def instruction_task(task):
    """The task re-expressed in the trained format: context = rendered prompt, choices = answers.

    Returns None when an item's answer does not name a choice key (answerN / optionN / true/false).
    """
    from layercap.data.tasks import MCItem, Task

    items = []
    for it in task.items:
        if not it.prompt or not it.answer:
            return None
        head, _, word = it.answer.strip().rpartition(" ")
        prefix = (head + " ") if head else ""
        m = _KEY.fullmatch(word.lower())
        if m:
            keys = [f"{m.group(1)}{i}" for i in range(1, len(it.choices) + 1)]
        elif word.lower() in ("true", "false") and len(it.choices) == 2:
            keys = ["false", "true"]  # tasks.py orders two-way choices no/yes = false/true
        else:
            return None
        if keys[it.label] != word.lower():
            return None
        items.append(MCItem(render_prompt(it.prompt), [prefix + k for k in keys], it.label))
    chance = sum(1.0 / len(i.choices) for i in items) / len(items)
    return Task(task.name, items, chance, task.source, task.sha256, "instruction")


def instruction_calibration(tokenizer, train_path: Path, nsamples: int, seqlen: int, seed: int = 0,
                            bos: BosChoice = NO_BOS):
    """Two disjoint CalibrationSets (train, validation) from the task's rendered training examples
    (position 0 of every window holds the BOS when ``bos.add``, see :func:`layercap.data.bos.put_bos`)."""
    from layercap.data.calibration import CalibrationSet, tokenize_text
    from layercap.data.tasks import load_task

    pairs = load_task(train_path).training_examples()
    random.Random(seed).shuffle(pairs)
    halves = (pairs[0::2], pairs[1::2])
    sets = []
    for half in halves:
        need = nsamples * seqlen
        text, tokens = [], 0
        for p, a in half:
            piece = render_prompt(p) + a
            text.append(piece)
            tokens += len(piece) // 3  # rough; the exact count is checked below
            if tokens > 2 * need:
                break
        ids = tokenize_text(tokenizer, "\n\n".join(text))
        if ids.numel() < need:
            raise LayercapError(f"{train_path}: not enough training text for {nsamples} x {seqlen} calibration "
                                "tokens; lower --calib-nsamples / --calib-seqlen.")
        windows = put_bos(ids[:need].reshape(nsamples, seqlen).clone(), bos)
        sets.append(CalibrationSet.of_windows(windows, str(train_path), seed, bos))
    return sets[0], sets[1]
