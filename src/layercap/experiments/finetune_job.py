"""One fine-tuning job: train an adapter with per-block capacity, evaluate it, write its record.

``finetune(model, tokenizer, counts, train_path, outdir, options, eval_path=...)`` is what
``layercap finetune`` runs and what each fine-tuning stage of the allocation sweep runs. It
validates everything before the first write, trains with
:func:`layercap.apply.finetune.train_adapter`, scores the eval split with
:mod:`layercap.evaluate` and writes OUTDIR:

    adapter/          LoRA-MoE safetensors + config, or a PEFT adapter
    finetune.json     ``layercap.finetune/v1`` (:class:`FinetuneResult`)
    run_config.json   the settings of the run (written before training; a resume must match)
    checkpoints/      Trainer checkpoints (removed at the end of a successful run)

Training data: a task file (JSON/JSONL/TSV of (prompt, answer) items, rendered with the
instruction template, loss on the answer tokens), or a text corpus (``.txt``/``.raw``: language
modelling, :mod:`layercap.data.domain`): its last ``heldout_fraction`` of tokens is held out,
the rest cut into training windows, loss on every token.

``nll`` (the headline continuous metric, nats per token): for a text corpus the NLL of the
held-out windows; for a task the answer-token NLL of the correct answer on the eval items in
the trained instruction format.

Evaluation (``eval_format``, task files):
  * ``instruction``: the trained format. Each item's prompt is rendered with the instruction
    template and the candidate answers "the correct answer is answer1" .. "answerN" (or
    true/false) are scored by log-likelihood. This is what fine-tuning changes, so it is the
    headline accuracy.
  * ``zero-shot``: the lm-evaluation-harness prompts of :mod:`layercap.data.tasks` (unchanged
    base-model protocol), to see whether the adapter also moved general choice scoring.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from layercap.apply.finetune import FinetuneOptions, check_counts_for, last_complete_checkpoint, save_adapter, train_adapter
from layercap.errors import LayercapError
from layercap.experiments.runner import check_run_dir
from layercap.io import atomic_write_json, read_json
from layercap.models.source import model_source

SCHEMA = "layercap.finetune/v1"
CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
RESULT_FILE = "finetune.json"
RUN_FILE = "run_config.json"


@dataclass
class FinetuneResult:
    """What a fine-tuning run did. Accuracies in [0, 1]; ``train_loss``: per logged step
    ``{"step", "loss" (total), "lm_loss" (answer-token NLL, nats), "aux_loss"}``; wall time in s."""

    model_source: str | None
    adapter: str
    allocation: dict[str, Any]
    options: dict[str, Any]
    steps: int
    train_examples: int
    train_source: str
    trainable_params: int
    train_loss: list[dict[str, float]]
    eval: dict[str, dict] = field(default_factory=dict)
    acc: float | None = None
    acc_norm: float | None = None
    nll: float | None = None
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    seed: int = 0
    resumed_from: str | None = None
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        d = _no_nan(asdict(self))
        d["schema"] = SCHEMA
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneResult":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a fine-tuning record: schema {d.get('schema')!r}, expected {SCHEMA!r}.")
        missing = [k for k in ("adapter", "allocation", "options", "steps", "train_loss") if k not in d]
        if missing:
            raise LayercapError(f"fine-tuning record lacks {missing}; rerun finetune.")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FinetuneResult":
        return cls.from_dict(read_json(path, "fine-tuning result", "Run `layercap finetune` first."))


def _no_nan(obj):
    """JSON has no NaN: undefined statistics (e.g. a standard error of one item) become null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def eval_tasks_for(eval_path, options: FinetuneOptions) -> dict[str, Any]:
    """The evaluation tasks by format; the subset does not depend on the training seed, so every
    run of a comparison is scored on the same items."""
    from layercap.data.instruction import instruction_task
    from layercap.data.tasks import load_task

    tasks: dict[str, Any] = {}
    if eval_path is None:
        return tasks
    base_eval = load_task(eval_path, limit=options.limit_eval, seed=0)
    if options.eval_format in ("instruction", "both"):
        inst = instruction_task(base_eval)
        if inst is None:
            raise LayercapError(
                f"{eval_path}: answers do not name choice keys (answerN / optionN / true/false), so the "
                "instruction format cannot be scored; pass --eval-format zero-shot."
            )
        tasks["instruction"] = inst
    if options.eval_format in ("zero-shot", "both"):
        tasks["zero-shot"] = base_eval
    return tasks


def evaluation_data(model, tokenizer, train_path, eval_path, options: FinetuneOptions):
    """(the DomainSplit of a text corpus or None, eval tasks by format): what a run is scored on."""
    from layercap.data.bos import resolve_bos
    from layercap.data.domain import domain_split, is_text_corpus

    if not is_text_corpus(train_path):
        return None, eval_tasks_for(eval_path, options)
    if eval_path is not None:
        raise LayercapError(f"{train_path} is a text corpus: it is evaluated on its own held-out part (the last "
                            f"heldout_fraction of its tokens); drop the eval file.")
    split = domain_split(tokenizer, train_path, options.max_length, options.heldout_fraction,
                         heldout_windows=options.limit_eval, bos=resolve_bos(options.bos, tokenizer, model))
    return split, {}


def training_data(model, tokenizer, train_path, eval_path, options: FinetuneOptions):
    """(encoded training examples, the DomainSplit of a text corpus or None, eval tasks by format).

    Everything is read and checked here, before a run writes anything."""
    from layercap.data.bos import resolve_bos
    from layercap.data.instruction import encode_example
    from layercap.data.tasks import load_task, subset_indices

    split, tasks = evaluation_data(model, tokenizer, train_path, eval_path, options)
    if split is not None:
        examples = split.examples()
        return [examples[i] for i in subset_indices(len(examples), options.limit_train, options.order_seed)], split, tasks
    train_task = load_task(train_path, limit=options.limit_train, seed=options.order_seed)
    pairs = train_task.training_examples()
    if not all(p and a for p, a in pairs):
        raise LayercapError(f"{train_path}: some items have no (prompt, answer) form for fine-tuning; use a task file.")
    bos = resolve_bos(options.bos, tokenizer, model)
    return [encode_example(tokenizer, p, a, options.max_length, bos) for p, a in pairs], None, tasks


def evaluate_adapter(model: nn.Module, tokenizer, tasks: dict[str, Any], options: FinetuneOptions,
                     split=None) -> tuple[dict[str, dict], dict | None, float | None]:
    """(results, headline task result, nll): accuracy per evaluation format (``TaskResult``
    dicts) and, for a text corpus (``split``), the held-out NLL (``results["heldout"]``). ``nll``
    (nats/token): the held-out NLL, else the headline task's answer-token NLL."""
    from layercap.evaluate.multiple_choice import evaluate_task
    from layercap.evaluate.perplexity import windows_nll
    from layercap.evaluate.shared_prefix import score_shared_prefix

    from layercap.data.bos import resolve_bos

    bos = resolve_bos(options.bos, tokenizer, model)
    results = {}
    for fmt, task in tasks.items():
        score = score_shared_prefix if fmt == "instruction" else evaluate_task
        results[fmt] = score(model, tokenizer, task, batch_size=options.eval_batch_size, progress=options.progress,
                             bos=bos).to_dict()
    head = results.get("instruction") or results.get("zero-shot")
    if split is None:
        return results, head, (head or {}).get("nll")
    results["heldout"] = {**windows_nll(model, split.heldout, options.eval_batch_size, options.progress),
                          "data": split.metadata()}
    return results, head, results["heldout"]["nll_per_token"]


def resume_point(outdir: Path, run_config: dict, resume: bool) -> tuple[Path | None, bool]:
    """(checkpoint to resume from, whether OUTDIR already holds the finished run). Refuses to mix
    runs: a finished run or checkpoints without ``resume``, or a resume with other settings."""
    checkpoints = outdir / CHECKPOINTS
    if (outdir / RESULT_FILE).exists() and not resume:
        raise LayercapError(f"{outdir} already holds a finished run ({RESULT_FILE}); choose a new -o, or delete it.")
    if checkpoints.exists() and any(checkpoints.iterdir()) and not resume:
        raise LayercapError(f"{checkpoints} holds checkpoints of an earlier run; pass --resume to continue it, or choose a new -o.")
    if not resume:
        return None, False
    previous = outdir / RUN_FILE
    if previous.is_file():
        from layercap.io import read_json

        before = read_json(previous, "run config", "It may be damaged; delete it to recompute, or choose a new -o.")
        if not isinstance(before, dict) or not isinstance(before.get("options"), dict):
            raise LayercapError(f"{previous}: not a run config layercap wrote; delete it or choose a new -o.")
        if before != json.loads(json.dumps(run_config)):
            diff = sorted(k for k in set(before["options"]) | set(run_config["options"])
                          if before["options"].get(k) != run_config["options"].get(k))
            raise LayercapError(
                f"--resume with different settings than the run in {outdir} (differs in: "
                f"{', '.join(diff) or 'allocation/data'}); use the same arguments or a new -o."
            )
    return last_complete_checkpoint(checkpoints), (outdir / RESULT_FILE).exists()


def finetune(
    model: nn.Module,
    tokenizer,
    counts: dict[str, int],
    train_path: str | os.PathLike,
    outdir: str | os.PathLike,
    options: FinetuneOptions,
    eval_path: str | os.PathLike | None = None,
    allocation: dict[str, Any] | None = None,
    resume: bool = False,
    callbacks: list | None = None,
) -> FinetuneResult:
    """Train adapters on ``train_path`` with per-block ``counts``; evaluate on ``eval_path``; write OUTDIR.

    ``model`` is modified in place (adapters injected). Everything is validated before the first
    write. ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. to stop early in tests).
    """
    from layercap.models.checks import check_seqlen

    outdir = check_run_dir(outdir, markers=(RUN_FILE, RESULT_FILE, CHECKPOINTS))
    check_seqlen(model, options.max_length, "--max-length")
    counts = check_counts_for(model, counts, options)
    dataset, split, tasks = training_data(model, tokenizer, train_path, eval_path, options)
    run_config = {"options": {k: v for k, v in options.to_dict().items() if k != "progress"}, "counts": counts,
                  "train": str(train_path), "eval": str(eval_path) if eval_path else None}
    resume_from, finished = resume_point(outdir, run_config, resume)
    if finished:
        return FinetuneResult.load(outdir / RESULT_FILE)

    started = time.perf_counter()
    created = not outdir.exists()
    try:
        atomic_write_json(outdir / RUN_FILE, run_config)
        trained = train_adapter(model, tokenizer, counts, dataset, outdir / CHECKPOINTS, options, resume_from, callbacks)
        results, head, nll = evaluate_adapter(trained.model, tokenizer, tasks, options, split)
    except Exception:
        # a failed first attempt leaves nothing that would block the corrected rerun (an
        # interruption keeps its checkpoints for --resume)
        if created:
            shutil.rmtree(outdir, ignore_errors=True)
        raise
    result = FinetuneResult(
        model_source=model_source(model), adapter=options.adapter, allocation=allocation or {"counts": counts},
        options=run_config["options"], steps=trained.steps, train_examples=trained.train_examples,
        train_source=str(train_path), trainable_params=trained.trainable_params, train_loss=trained.curve,
        eval=results, acc=head["acc"] if head else None, acc_norm=head["acc_norm"] if head else None, nll=nll,
        wall_time_s=time.perf_counter() - started, train_time_s=trained.train_time_s, seed=options.seed,
        resumed_from=trained.resumed_from,
    )
    save_adapter(trained.model, trained.moe_config, outdir / ADAPTER_DIR, options.adapter)
    result.save(outdir / RESULT_FILE)
    # the adapter and record are complete: intermediate checkpoints are no longer needed
    shutil.rmtree(outdir / CHECKPOINTS, ignore_errors=True)
    return result
