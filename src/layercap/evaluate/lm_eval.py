"""lm-evaluation-harness on the in-memory model, with local task definitions (no hub access).

The task YAMLs shipped in ``lm_eval_tasks/`` (``arc_easy``, ``arc_challenge``, ``boolq``,
``openbookqa``, ``commonsenseqa``) read the ``../shared/data`` task files through the ``json``
dataset builder; their ``data_files`` are rewritten here to ``data_root`` (default
``$LAYERCAP_SHARED_DATA``, else ``../shared/data`` relative to the working directory). A path to
any other task YAML is accepted too (relative data files are then taken from the working
directory).

``limit`` selects the *same* seeded subset as layercap's own evaluator (``load_task(limit,
seed)``, passed to the harness as ``samples``), not the harness's first-N, so that
``acc``/``acc_norm`` of the two evaluators are computed on identical items.

The harness (``lm_eval.models.huggingface.HFLM``) does the tokenisation (``_encode_pair``), the
batched log-likelihoods and the metrics. Nothing here touches the network: the datasets are local
files and the model is passed as an object.
"""

from __future__ import annotations

import os
from pathlib import Path

from layercap.errors import LayercapError

TASK_DIR = Path(__file__).with_name("lm_eval_tasks")
SHARED_PREFIX = "../shared/data"


def local_tasks() -> dict[str, Path]:
    """Short name (``arc_easy``) -> shipped YAML."""
    return {p.stem: p for p in sorted(TASK_DIR.glob("*.yaml"))}


def default_data_root() -> Path:
    return Path(os.environ.get("LAYERCAP_SHARED_DATA", SHARED_PREFIX))


def parse_tasks(text: str) -> list[str]:
    """``"arc_easy,boolq"`` -> names; each a shipped task (short or ``layercap_`` name) or a YAML path."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not names:
        raise LayercapError("--lm-eval names no task; pass e.g. --lm-eval arc_easy,boolq.")
    known = local_tasks()
    for n in names:
        short = n.removeprefix("layercap_")
        if short not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file()):
            raise LayercapError(
                f"--lm-eval task {n!r} is neither a shipped local task ({', '.join(known)}) nor a task YAML file. "
                "Hub tasks are not available offline; write a YAML with dataset_path: json and local data_files."
            )
    return names


def task_config(name: str, data_root: str | os.PathLike | None = None) -> tuple[dict, dict[str, Path]]:
    """(lm-eval task config dict, split -> local data file) for a shipped task name or a YAML path."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the harness's loader: !function, include

    known = local_tasks()
    path = known.get(name.removeprefix("layercap_")) or Path(name)
    config = load_yaml(path)  # resolves `!function utils.x` next to the YAML
    root = Path(data_root) if data_root is not None else default_data_root()
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if config.get("dataset_path") != "json" or not isinstance(files, dict):
        raise LayercapError(f"{path}: a local task needs dataset_path: json and dataset_kwargs.data_files: {{split: file}}.")
    resolved = {}
    for split, f in files.items():
        f = str(f)
        p = root / f[len(SHARED_PREFIX) + 1 :] if f.startswith(SHARED_PREFIX + "/") else Path(f)
        if not p.is_file():
            raise LayercapError(
                f"{path}: data file {p} (split {split!r}) does not exist; set LAYERCAP_SHARED_DATA to the shared data "
                "directory or run from the repository root."
            )
        resolved[split] = p.resolve()
    kwargs["data_files"] = {k: str(v) for k, v in resolved.items()}
    config["dataset_kwargs"] = kwargs
    return config, resolved


def _n_docs(file: Path) -> int:
    from layercap.data.tasks import load_task

    return len(load_task(file))


def run_lm_eval(model, tokenizer, tasks: str | list[str], batch_size: int = 8, limit: int | None = None, seed: int = 0,
                device: str | None = None, data_root: str | os.PathLike | None = None, per_item: bool = False) -> dict:
    """Run the harness on ``model`` for ``tasks``; returns a JSON-safe summary.

    ``{"lm_eval_version", "tasks": {short name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
    "n", "source", "indices"?}}, "results": <the harness's results dict>}``. ``indices``: the doc
    indices evaluated when ``limit`` is set (the same subset as ``load_task(limit=, seed=)``).
    ``per_item``: also ``"loglikelihoods"``, doc index -> the harness's summed log-probability (nats)
    of each choice, in choice order.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise LayercapError("--lm-eval needs lm-evaluation-harness: `pip install -e .[interop]` (or `pip install lm-eval`).") from exc
    from layercap.data.tasks import subset_indices

    names = parse_tasks(tasks) if isinstance(tasks, str) else list(tasks)
    configs, samples, sources = [], {}, {}
    for n in names:
        config, files = task_config(n, data_root)
        split = config.get("test_split") or "test"
        if split not in files:
            raise LayercapError(f"task {n}: test_split {split!r} has no entry in data_files.")
        sources[config["task"]] = str(files[split])
        if limit is not None:
            samples[config["task"]] = subset_indices(_n_docs(files[split]), limit, seed)
        configs.append(config)
    dev = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=dev)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=configs, num_fewshot=0, samples=samples or None, log_samples=per_item,
        random_seed=None, numpy_random_seed=None, torch_random_seed=None,
    )
    results = dict(out["results"]) if out is not None else {}
    summary = {}
    for task, src in sources.items():
        r = results.get(task, {})
        row = {
            "acc": r.get("acc,none"), "acc_stderr": r.get("acc_stderr,none"),
            "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": r.get("acc_norm_stderr,none"),
            "n": len(samples[task]) if task in samples else None, "source": src,
        }
        if task in samples:
            row["indices"] = samples[task]
        if per_item:
            row["loglikelihoods"] = {int(d["doc_id"]): [float(r[0]) for r in d["filtered_resps"]]
                                     for d in (out.get("samples") or {}).get(task, [])}
        summary[task.removeprefix("layercap_")] = row
    return {"lm_eval_version": getattr(lm_eval, "__version__", None), "tasks": summary, "results": _json_safe(results)}


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
