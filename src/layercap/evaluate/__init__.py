"""Evaluation: perplexity on text files and zero-shot multiple-choice accuracy on task files.

``evaluate_model`` runs both and returns an ``EvalResult`` (schema ``layercap.eval/v1``).

Mean accuracy. ``mean_acc`` is the mean ``acc`` over all tasks given. Small models sit at chance
on several tasks, where pruning damage cannot show, so ``mean_acc_above_chance`` averages only
the tasks flagged ``above_chance``: those where a *reference* model (the dense model, passed as
``reference``; the evaluated model itself when none is given) beats uniform guessing by more than
two standard errors (``acc - chance > 2 * acc_stderr``). It is ``None`` when no task qualifies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from layercap.errors import LayercapError
from layercap.evaluate.multiple_choice import TaskResult, evaluate_task
from layercap.evaluate.perplexity import PerplexityResult, perplexity
from layercap.io import atomic_write_json

SCHEMA = "layercap.eval/v1"
ABOVE_CHANCE_SIGMAS = 2.0

__all__ = [
    "EvalResult",
    "PerplexityResult",
    "TaskResult",
    "above_chance_tasks",
    "evaluate_model",
    "evaluate_task",
    "perplexity",
]


def above_chance_tasks(tasks: dict[str, TaskResult], sigmas: float = ABOVE_CHANCE_SIGMAS) -> list[str]:
    """Names of the tasks whose ``acc`` exceeds ``chance`` by more than ``sigmas`` standard errors."""
    return [k for k, t in tasks.items() if t.acc - t.chance > sigmas * (t.acc_stderr if t.acc_stderr == t.acc_stderr else 0.0)]


@dataclass
class EvalResult:
    """``ppl``: per text file (key: file name); ``tasks``: per task (key: task name);
    ``above_chance``: task keys used by ``mean_acc_above_chance`` (see module docstring);
    ``reference``: what decided them ("self" or the reference model's name)."""

    model: str
    ppl: dict[str, PerplexityResult] = field(default_factory=dict)
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    above_chance: list[str] = field(default_factory=list)
    reference: str = "self"
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_acc(self) -> float | None:
        return sum(t.acc for t in self.tasks.values()) / len(self.tasks) if self.tasks else None

    @property
    def mean_acc_above_chance(self) -> float | None:
        keep = [self.tasks[k].acc for k in self.above_chance if k in self.tasks]
        return sum(keep) / len(keep) if keep else None

    def with_reference(self, reference: "EvalResult") -> "EvalResult":
        """Copy whose ``above_chance`` tasks are those of ``reference`` (e.g. the dense model)."""
        flags = [k for k in above_chance_tasks(reference.tasks) if k in self.tasks]
        return EvalResult(self.model, self.ppl, self.tasks, flags, reference.model, self.settings, self.seconds)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "ppl": {k: v.to_dict() for k, v in self.ppl.items()},
            "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
            "mean_acc": self.mean_acc,
            "mean_acc_above_chance": self.mean_acc_above_chance,
            "above_chance": list(self.above_chance),
            "reference": self.reference,
            "settings": dict(self.settings),
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not an evaluation result: schema {d.get('schema')!r}, expected {SCHEMA!r}.")
        return cls(
            model=d["model"],
            ppl={k: PerplexityResult.from_dict(v) for k, v in d.get("ppl", {}).items()},
            tasks={k: TaskResult.from_dict(v) for k, v in d.get("tasks", {}).items()},
            above_chance=list(d.get("above_chance", [])),
            reference=d.get("reference", "self"),
            settings=dict(d.get("settings", {})),
            seconds=float(d.get("seconds", 0.0)),
        )

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        from layercap.io import read_json

        doc = read_json(path, "evaluation result", "Pass an eval.json written by `layercap evaluate`.")
        if not isinstance(doc, dict):
            raise LayercapError(f"evaluation result {path}: expected a JSON object, got {type(doc).__name__}.")
        try:
            return cls.from_dict(doc)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LayercapError):
                raise
            raise LayercapError(f"evaluation result {path}: malformed record ({type(exc).__name__}: {exc}).") from None

    def table(self) -> str:
        """Readable plain-text summary."""
        lines = [f"model: {self.model}"]
        for k, p in self.ppl.items():
            lines.append(f"  ppl  {k:<28} {p.ppl:10.3f}   ({p.tokens} tokens, seqlen {p.seqlen}, stride {p.stride})")
        for k, t in self.tasks.items():
            flag = "*" if k in self.above_chance else " "
            lines.append(
                f"  task {k:<27}{flag} acc {t.acc:.4f} ± {t.acc_stderr:.4f}  acc_norm {t.acc_norm:.4f}  n {t.n:5d}  chance {t.chance:.3f}"
            )
        if self.tasks:
            above = self.mean_acc_above_chance
            lines.append(
                f"  mean acc {self.mean_acc:.4f}; over tasks above chance (*, ref: {self.reference}) "
                + (f"{above:.4f}" if above is not None else "n/a (no task above chance)")
            )
        return "\n".join(lines)


def _unique_key(name: str, taken: dict) -> str:
    key, i = name, 2
    while key in taken:
        key, i = f"{name}#{i}", i + 1
    return key


def evaluate_model(
    model,
    tokenizer,
    ppl: list[str | Path] = (),
    tasks: list[str | Path] = (),
    limit: int | None = None,
    seqlen: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device=None,
    reference: EvalResult | None = None,
    model_name: str = "model",
    progress: bool = True,
    bos="auto",
) -> EvalResult:
    """Perplexity on each ``ppl`` file and zero-shot accuracy on each ``tasks`` file/directory.

    All task files are parsed before any model work, so bad input fails fast. ``limit``: seeded
    random subset of that many items per task (``seed``). ``bos``: ``auto``/``always``/``never``
    or a :class:`~layercap.data.bos.BosChoice`, decided once for the model and used for every
    text and task (recorded under ``settings["bos"]``).
    """
    from layercap.data.bos import as_bos_choice
    from layercap.data.tasks import load_task

    loaded = [load_task(t, limit=limit, seed=seed) for t in tasks]
    for p in ppl:
        if not Path(p).exists():
            raise LayercapError(f"perplexity text {str(p)!r} does not exist; pass --ppl with a text file.")
    choice = as_bos_choice(bos, tokenizer, model)
    if device is not None:
        model.to(device)
    start = time.perf_counter()
    result = EvalResult(
        model=model_name,
        settings=dict(limit=limit, seqlen=seqlen, stride=stride or seqlen, max_tokens=max_tokens, batch_size=batch_size, seed=seed,
                      bos=choice.to_dict()),
    )
    for p in ppl:
        r = perplexity(model, tokenizer, p, seqlen=seqlen, stride=stride, max_tokens=max_tokens, batch_size=max(1, batch_size // 2), device=device, progress=progress, bos=choice)
        result.ppl[_unique_key(Path(p).name, result.ppl)] = r
    for task in loaded:
        result.tasks[_unique_key(task.name, result.tasks)] = evaluate_task(model, tokenizer, task, batch_size=batch_size, device=device, progress=progress, bos=choice)
    result.seconds = time.perf_counter() - start
    result.above_chance = above_chance_tasks(result.tasks)
    return result.with_reference(reference) if reference is not None else result
