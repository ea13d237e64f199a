"""The pipeline config of ``layercap run``: typed sections, validation, ``--set`` overrides.

A config is a YAML mapping with the sections ``model``, ``data``, ``scoring``, ``allocation``,
``pruning``, ``evaluation``, ``report``. Every field has a default (the embedded
``experiments/default.yaml`` restates them all), so a user config only lists what it changes.
Validation is strict: an unknown key raises LayercapError naming the key and the allowed keys; a
bad value names the key and the allowed values or range. :func:`config_table` renders the
field table documented in the README.

Data paths (``data.calibration``, ``evaluation.perplexity``, ``evaluation.tasks_dir``) are
resolved against ``data.root``; ``data.root`` itself is resolved against the current working
directory and defaults to ``$LAYERCAP_SHARED_DATA`` or, when that is unset, ``../shared/data``.
Absolute paths are used as given.
"""

from __future__ import annotations

import copy
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from layercap.errors import LayercapError
from layercap.io import read_yaml
from layercap.programs import rules as _rules

SCHEMA = "layercap.pipeline-config/v1"

class RegisteredScoreMethods:
    """The score registry's method names, looked up when a config is validated (importing the
    registry's plugins pulls in torch and transformers, which a config alone does not need).
    Iterates like a tuple; ``str()`` is the README's description."""

    ORDER = ("gradnorm", "diag", "kfac", "ekfac", "exact", "influence", "alpha-hill", "owl")  # curvature first

    def names(self) -> tuple[str, ...]:
        from layercap.scores import available_methods

        known = available_methods()
        return tuple(m for m in self.ORDER if m in known) + tuple(m for m in known if m not in self.ORDER)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()


SCORE_METHODS = RegisteredScoreMethods()


class AllocationRuleSpecs:
    """Allowed allocation rules: every registered rule, plus ``mdl:measured`` (the concave program
    on utility curves measured in the run). Iterates like a tuple."""

    def names(self) -> tuple[str, ...]:
        return tuple(_rules.ALLOCATION_RULES) + tuple(_rules.UTILITY_RULES)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()


ALLOCATION_RULES = AllocationRuleSpecs()


class PruningRuleSpecs:
    """Allowed pruning rules: every registered rule, plus ``mdl:damage`` / ``mdl:obd`` (the
    convex-damage program on measured or second-order damage curves). Iterates like a tuple."""

    def names(self) -> tuple[str, ...]:
        return tuple(_rules.PRUNING_RULES) + tuple(f"mdl:{k}" for k in _rules.DAMAGE_SOURCES + _rules.LINEAR_SOURCES)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()


RATIO_RULES = PruningRuleSpecs()
# The score source each baseline rule reads. The others read the section's `scores` (mdl,
# proportional) or use it only for the block names and sizes (uniform, MoLA patterns).
RULE_SOURCES = {(section, name): rule.source
                for section, rules in (("allocation", _rules.ALLOCATION_RULES), ("pruning", _rules.PRUNING_RULES))
                for name, rule in rules.items() if rule.source not in (None, _rules.CURVATURE, _rules.MEASURED)}
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")  # layercap.apply.prune.PRUNERS (a test keeps them equal)


def _f(doc: str, *, choices: tuple | None = None, lo: float | None = None, hi: float | None = None,
       kind: str | None = None, default: Any = MISSING, default_factory: Any = MISSING):
    """A dataclass field carrying its documentation and its allowed values (used by validation)."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "kind": kind}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _default_root() -> str:
    return os.environ.get("LAYERCAP_SHARED_DATA") or "../shared/data"


@dataclass
class ModelConfig:
    spec: str = _f("bundled name (`smollm2`), a save_pretrained directory, a `.gguf` file, or `tiny-<family>` "
                   "(random-init test model built locally and saved into the run directory)", kind="str", default="smollm2")
    dtype: str = _f("parameter dtype while scoring, pruning and evaluating", choices=("float32", "bfloat16", "float16"), default="float32")
    device: str = _f("`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`", kind="device", default="auto")
    blocks: str | None = _f("regex of block module names (default: structural discovery)", kind="str?", default=None)
    modules: str | None = _f("regex of Linear names inside a block (default: all)", kind="str?", default=None)
    tiny_layers: int = _f("blocks of a `tiny-<family>` model", kind="int", lo=1, default=4)
    tiny_hidden: int = _f("hidden width of a `tiny-<family>` model (multiple of 4)", kind="int", lo=8, default=32)
    seed: int = _f("seed of a `tiny-<family>` model's random init", kind="int", lo=0, default=0)


@dataclass
class DataConfig:
    root: str = _f("folder that relative data paths are resolved against (itself relative to the working directory); "
                   "default `$LAYERCAP_SHARED_DATA` or `../shared/data`", kind="str", default_factory=_default_root)
    calibration: str = _f("calibration text: a text file, a JSON/JSONL task file, or a directory",
                          kind="str", default="corpora/wikitext-2-raw/wiki.test.raw")
    nsamples: int = _f("calibration windows", kind="int", lo=1, default=4)
    seqlen: int = _f("tokens per calibration window", kind="int", lo=2, default=256)
    seed: int = _f("seed of the window offsets", kind="int", lo=0, default=0)
    start_token: int = _f("calibration windows are drawn from this token on; the tokens before it are held out for "
                          "evaluation (a perplexity text that is also the calibration text must fit in them)",
                          kind="int", lo=0, default=8192)
    bos: str = _f("BOS token at the start of every window and request: `auto` (as lm-evaluation-harness: Gemma, "
                  "or a tokenizer that adds BOS by default), `always`, `never`", choices=("auto", "always", "never"),
                  default="auto")


@dataclass
class ScoringConfig:
    methods: list = _f("score sources to compute (curvature estimators and baselines); the first curvature method "
                       "listed is plotted first", kind="list", choices=SCORE_METHODS,
                       default_factory=lambda: ["gradnorm", "diag", "kfac", "alpha-hill", "owl"])
    batch_size: int = _f("calibration windows per forward/backward pass", kind="int", lo=1, default=4)
    damping: float = _f("relative damping rho (lambda_k = rho x mean eigenvalue of C_k)", kind="float", lo=0.0, default=0.1)
    options: dict = _f("extra keyword arguments of `ScoreOptions` (e.g. `{fisher: true}`)", kind="dict", default_factory=dict)


@dataclass
class AllocationConfig:
    scores: str = _f("score source of the `mdl` and `proportional` rules", choices=SCORE_METHODS, default="kfac")
    rules: list = _f("allocation rules to compute on the same budget", kind="list", choices=ALLOCATION_RULES,
                     default_factory=lambda: ["mdl", "uniform", "mola-2468", "mola-8642", "alphalora"])
    budget: float = _f("total capacity units (e.g. LoRA experts) over all blocks", kind="float", lo=0.0, default=120)
    unit: str = _f("what one capacity unit is", choices=("experts", "rank", "units"), default="experts")
    lower: float = _f("at least this many units per block", kind="float", lo=0.0, default=1)
    upper: float | None = _f("at most this many units per block (null: no cap)", kind="float?", lo=0.0, default=None)
    beta: float = _f("curvature exponent beta on q_k (0 = uniform, 1 = proportional; paper: 0.9)", kind="float", lo=0.0, default=0.9)
    alpha: Any = _f("`auto` (the budget is spent exactly) or a number > 0", kind="auto-or-float", lo=0.0, default="auto")
    integer: bool = _f("whole units per block (greedy, with an optimality gap certificate)", kind="bool", default=True)
    utility_levels: list = _f("`mdl:measured`: units at which each block alone is adapted (0 first)", kind="ints",
                              default_factory=lambda: [0, 1, 2, 4, 8])
    utility_steps: int = _f("`mdl:measured`: Adam steps per (block, level)", kind="int", lo=1, default=5)
    utility_lr: float = _f("`mdl:measured`: their learning rate", kind="float", lo=1e-12, default=1e-3)
    utility_rank: int = _f("`mdl:measured`: LoRA rank of one unit", kind="int", lo=1, default=4)


@dataclass
class PruningConfig:
    scores: str = _f("score source of the `mdl` ratio rule", choices=SCORE_METHODS, default="kfac")
    rules: list = _f("ratio rules to compute at the same sparsity (`mdl`: the paper's zeta^2 program; `mdl:obd` / "
                     "`mdl:damage`: the convex program on second-order / measured damage curves; `mdl:context`: on curves measured "
                     "with every other block pruned at the target; `-linear`: a ratio per Linear from tables with a row per "
                     "Linear)", kind="list",
                     choices=RATIO_RULES, default_factory=lambda: ["mdl:obd-linear", "mdl", "uniform", "owl", "alphapruning"])
    apply: list = _f("ratio rules actually pruned and evaluated (subset of `rules`)", kind="list", choices=RATIO_RULES,
                     default_factory=lambda: ["mdl:obd-linear", "uniform"])
    sparsity: float = _f("global fraction of prunable weights removed", kind="float", lo=0.0, hi=1.0, default=0.5)
    mode: str = _f("MDL program: `exact` (meet the target) or `at-least` (the paper's literal program)",
                   choices=("exact", "at-least"), default="exact")
    eta: float = _f("curvature exponent eta on q_k in the pruning program", kind="float", lo=0.0, default=1.0)
    min_ratio: float = _f("lowest per-block ratio rho_min", kind="float", lo=0.0, hi=1.0, default=0.0)
    max_ratio: float = _f("highest per-block ratio rho_max", kind="float", lo=0.0, hi=1.0, default=0.95)
    method: str = _f("pruning criterion", choices=PRUNE_METHODS, default="wanda")
    structure: str = _f("`unstructured` or N:M, e.g. `2:4`", kind="structure", default="unstructured")
    damage_levels: list = _f("ratios at which `mdl:obd` / `mdl:damage` evaluate each block's damage", kind="floats",
                             default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    save_checkpoints: bool = _f("save each pruned model under `pruned/<rule>/` (false: re-prune in memory "
                                "when evaluating, to save disk)", kind="bool", default=True)
    save_format: str = _f("format of the saved pruned checkpoints: `dense` safetensors, or `compressed-tensors` "
                          "(sparse bitmask; the 2:4 format for 2:4)", choices=("dense", "compressed-tensors"), default="dense")


@dataclass
class EvaluationConfig:
    dense: bool = _f("also evaluate the unpruned model (the reference row)", kind="bool", default=True)
    perplexity: list = _f("corpora for perplexity (paths relative to `data.root`)", kind="list",
                          default_factory=lambda: ["corpora/wikitext-2-raw/wiki.test.raw"])
    ppl_tokens: int = _f("tokens of each corpus used for perplexity (from its start)", kind="int", lo=2, default=4096)
    ppl_seqlen: int = _f("perplexity window length", kind="int", lo=2, default=512)
    tasks: list = _f("zero-shot multiple-choice tasks (folder names under `tasks_dir`)", kind="list",
                     default_factory=lambda: ["ARC-Easy", "boolq", "commonsenseqa"])
    tasks_dir: str = _f("folder holding the task folders (relative to `data.root`)", kind="str", default="tasks")
    limit: int | None = _f("items per task (a seeded random subset of N; null: all)", kind="int?", lo=1, default=20)
    batch_size: int = _f("sequences per forward pass", kind="int", lo=1, default=8)


@dataclass
class ReportConfig:
    title: str | None = _f("report title (default: from the model and the run directory)", kind="str?", default=None)
    html: bool = _f("also write the self-contained `report.html`", kind="bool", default=True)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "scoring": ScoringConfig,
    "allocation": AllocationConfig,
    "pruning": PruningConfig,
    "evaluation": EvaluationConfig,
    "report": ReportConfig,
}


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **{name: asdict(getattr(self, name)) for name in SECTIONS}}

    @classmethod
    def from_dict(cls, doc: Any, source: str = "config") -> "PipelineConfig":
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise LayercapError(f"{source}: a pipeline config is a YAML mapping of sections ({', '.join(SECTIONS)}), "
                                f"got {type(doc).__name__}.")
        doc = dict(doc)
        schema = doc.pop("schema", SCHEMA)
        if schema != SCHEMA:
            raise LayercapError(f"{source}: unknown schema {schema!r}; this layercap reads {SCHEMA!r}.")
        unknown = sorted(set(doc) - set(SECTIONS))
        if unknown:
            raise LayercapError(f"{source}: unknown section {unknown[0]!r}; allowed sections: {', '.join(SECTIONS)}.")
        parts = {name: _section(SECTIONS[name], doc.get(name), f"{source}: {name}") for name in SECTIONS}
        config = cls(**parts)
        config.check()
        return config

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | Path) -> Path:
        from layercap.io import atomic_write_text

        return atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "PipelineConfig":
        return load_config(path, overrides)

    # ---- cross-field checks ------------------------------------------------------------------
    def check(self) -> None:
        for section, rules in (("allocation", self.allocation.rules), ("pruning", self.pruning.rules)):
            for rule in rules:
                source = RULE_SOURCES.get((section, rule))
                if source and source not in self.scoring.methods:
                    raise LayercapError(
                        f"{section}.rules includes {rule!r}, which needs the {source!r} scores: add {source} to "
                        f"scoring.methods (now {self.scoring.methods}) or drop {rule!r}."
                    )
        for section, scores, rules in (("allocation", self.allocation.scores, self.allocation.rules),
                                       ("pruning", self.pruning.scores, self.pruning.rules)):
            if scores not in self.scoring.methods and any(r in ("mdl", "proportional") for r in rules):
                raise LayercapError(
                    f"{section}.scores = {scores!r} is not computed: add it to scoring.methods (now {self.scoring.methods})."
                )
        for ppl in self.evaluation.perplexity:
            if self.data_path(ppl) == self.data_path(self.data.calibration) and self.evaluation.ppl_tokens > self.data.start_token:
                raise LayercapError(
                    f"evaluation.perplexity reads the first {self.evaluation.ppl_tokens} tokens of {ppl}, the calibration "
                    f"text, but calibration windows start at data.start_token = {self.data.start_token}: evaluation "
                    "and calibration tokens would overlap. Raise data.start_token or lower evaluation.ppl_tokens.")
        from layercap.programs.damage import check_levels

        check_levels(self.pruning.damage_levels, "pruning.damage_levels")
        missing = [r for r in self.pruning.apply if r not in self.pruning.rules]
        if missing:
            raise LayercapError(f"pruning.apply includes {missing[0]!r}, which is not in pruning.rules {self.pruning.rules}; "
                                "add it there too.")
        if self.pruning.min_ratio > self.pruning.max_ratio:
            raise LayercapError(f"pruning.min_ratio = {self.pruning.min_ratio} exceeds pruning.max_ratio = "
                                f"{self.pruning.max_ratio}; choose min_ratio <= sparsity <= max_ratio.")
        if self.allocation.upper is not None and self.allocation.upper < self.allocation.lower:
            raise LayercapError(f"allocation.upper = {self.allocation.upper} is below allocation.lower = {self.allocation.lower}.")
        if self.model.spec.startswith("tiny-"):
            from layercap.models.tiny import FAMILIES

            if self.model.spec[len("tiny-"):] not in FAMILIES:
                raise LayercapError(f"model.spec = {self.model.spec!r}: no such tiny model; use one of "
                                    f"{', '.join('tiny-' + f for f in FAMILIES)}.")
        if self.model.spec.startswith("tiny-") and self.model.tiny_hidden % 4:
            raise LayercapError(f"model.tiny_hidden = {self.model.tiny_hidden} must be a multiple of 4 (4 attention heads).")

    # ---- resolved data paths -----------------------------------------------------------------
    def data_path(self, path: str) -> Path:
        """``path`` resolved against ``data.root`` (absolute paths unchanged)."""
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        return Path(os.path.normpath((Path(self.data.root).expanduser() / p).absolute()))


def _section(cls: type, doc: Any, where: str):
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise LayercapError(f"{where}: must be a mapping of keys ({', '.join(f.name for f in fields(cls))}), got {doc!r}.")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise LayercapError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}.")
    values = {}
    for f in fields(cls):
        if f.name in doc:
            values[f.name] = _check_value(f, doc[f.name], f"{where}.{f.name}")
    return cls(**values)


def _range_text(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f"a number in [{lo}, {hi}]"
    if lo is not None:
        return f"a number >= {lo}"
    return "a number"


def _check_value(f, value: Any, key: str) -> Any:
    meta = dict(f.metadata)
    kind, choices, lo, hi = meta.get("kind"), meta.get("choices"), meta.get("lo"), meta.get("hi")
    optional = kind is not None and kind.endswith("?")
    base = kind.rstrip("?") if kind else None
    if value is None:
        if optional:
            return None
        raise LayercapError(f"{key} must be set (null is not allowed here); default: {_default_of(f)!r}.")
    if kind is None:  # a plain choice
        if value not in choices:
            raise LayercapError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(choices)}.")
        return value
    if base == "str":
        if not isinstance(value, str) or not value:
            raise LayercapError(f"{key} = {value!r} must be a non-empty string.")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise LayercapError(f"{key} = {value!r} must be true or false.")
        return value
    if base in ("int", "float", "auto-or-float"):
        if base == "auto-or-float" and value == "auto":
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if base == "int":
            ok = ok and float(value).is_integer()
        if ok and value == value and abs(value) != float("inf") and (lo is None or value >= lo) and (hi is None or value <= hi):
            return int(value) if base == "int" else float(value)
        what = ("an integer" if base == "int" else _range_text(meta))
        if base == "int" and lo is not None:
            what = f"an integer >= {lo}"
        if base == "auto-or-float":
            what = f"'auto' or {_range_text(meta)}"
        raise LayercapError(f"{key} = {value!r} is out of range; allowed: {what}.")
    if base == "floats":
        if not isinstance(value, list) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in value):
            raise LayercapError(f"{key} = {value!r} must be a non-empty list of numbers in [0, 1), e.g. [0.25, 0.5].")
        return [float(v) for v in value]
    if base == "ints":
        from layercap.programs.utility import check_unit_levels

        return check_unit_levels(value, key)
    if base == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise LayercapError(f"{key} = {value!r} must be a list of names, e.g. [a, b].")
        if choices:
            bad = [v for v in value if v not in choices]
            if bad:
                raise LayercapError(f"{key} contains {bad[0]!r}, which is not allowed; choose from: {', '.join(choices)}.")
        if len(set(value)) != len(value):
            raise LayercapError(f"{key} = {value!r} lists a name twice.")
        return list(value)
    if base == "dict":
        if not isinstance(value, dict):
            raise LayercapError(f"{key} = {value!r} must be a mapping, e.g. {{name: value}}.")
        return dict(value)
    if base == "device":
        if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())):
            raise LayercapError(f"{key} = {value!r} is not allowed; choose auto, cpu, cuda or cuda:N.")
        return value
    if base == "structure":
        if value == "unstructured":
            return value
        parts = str(value).split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1]):
            return str(value)
        raise LayercapError(f"{key} = {value!r} is not allowed; choose 'unstructured' or N:M with 0 < N < M (e.g. 2:4).")
    raise AssertionError(f"unknown field kind {kind!r}")  # pragma: no cover


def _default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


# ---- loading and overrides -------------------------------------------------------------------
def default_config_text() -> str:
    """The embedded ``experiments/default.yaml``."""
    return resources.files("layercap.experiments").joinpath("default.yaml").read_text(encoding="utf-8")


def _read_yaml(text: str, source: str) -> Any:
    from layercap.io import yaml_load

    try:
        return yaml_load(text, source)
    except yaml.YAMLError as exc:
        raise LayercapError(f"{source}: not valid YAML ({' '.join(str(exc).split())}).") from exc


def apply_override(doc: dict, item: str) -> None:
    """Apply one ``section.key=value`` override to the raw config mapping (value parsed as YAML)."""
    if "=" not in item:
        raise LayercapError(f"--set {item!r}: expected section.key=value, e.g. --set scoring.methods=[gradnorm,diag].")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise LayercapError(f"--set {item!r}: the key must be section.key (sections: {', '.join(SECTIONS)}).")
    section, name = parts
    if section not in SECTIONS:
        raise LayercapError(f"--set {item!r}: unknown section {section!r}; allowed sections: {', '.join(SECTIONS)}.")
    allowed = [f.name for f in fields(SECTIONS[section])]
    if name not in allowed:
        raise LayercapError(f"--set {item!r}: unknown key {name!r} in section {section!r}; allowed keys: {', '.join(allowed)}.")
    value = _read_yaml(raw, f"--set {key}")
    sec = doc.setdefault(section, {})
    if sec is None:
        sec = doc[section] = {}
    if not isinstance(sec, dict):
        raise LayercapError(f"config section {section!r} must be a mapping.")
    sec[name] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The embedded default, updated by the YAML file at ``path`` (if any), then by ``overrides``."""
    doc = _read_yaml(default_config_text(), "default.yaml") or {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LayercapError(f"config file {str(path)!r} does not exist; pass a YAML file (see examples/) or none "
                                "for the embedded default.")
        user = read_yaml(path, "pipeline config", "pass a YAML file (see examples/)")
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise LayercapError(f"{path}: a pipeline config is a mapping of sections ({', '.join(SECTIONS)}).")
        schema = user.pop("schema", SCHEMA)
        if schema != SCHEMA:
            raise LayercapError(f"{path}: schema {schema!r} is not one this version reads ({SCHEMA!r}); write "
                                f"`schema: {SCHEMA}` or drop the key.")
        unknown = sorted(set(user) - set(SECTIONS))
        if unknown:
            raise LayercapError(f"{path}: unknown section {unknown[0]!r}; allowed sections: {', '.join(SECTIONS)}.")
        for section, values in user.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise LayercapError(f"{path}: section {section!r} must be a mapping of keys, got {values!r}.")
            base = doc.setdefault(section, {}) or {}
            base.update(values)
            doc[section] = base
    source = str(path) if path is not None else "default config"
    for item in overrides:
        apply_override(doc, item)
    # data.root: the environment variable wins over the embedded default but not over a user value.
    if os.environ.get("LAYERCAP_SHARED_DATA") and not _user_set_root(path, overrides):
        doc.setdefault("data", {})["root"] = os.environ["LAYERCAP_SHARED_DATA"]
    return PipelineConfig.from_dict(copy.deepcopy(doc), source=source)


def _user_set_root(path: Path | None, overrides) -> bool:
    if any(o.split("=", 1)[0].strip() == "data.root" for o in overrides):
        return True
    if path is not None:
        user = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return isinstance(user.get("data"), dict) and "root" in user["data"]
    return False


def config_table() -> str:
    """Markdown table of every config field: key, default, allowed values, meaning."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            meta = f.metadata
            default = _default_of(f)
            if section == "data" and f.name == "root":
                default = "../shared/data"
            allowed = ""
            if isinstance(meta.get("choices"), RegisteredScoreMethods):
                allowed = "a registered score method (`layercap score --help` lists them)"
            elif meta.get("choices"):
                allowed = " / ".join(meta["choices"])
            elif (meta.get("kind") or "").rstrip("?") in ("int", "float", "auto-or-float"):
                allowed = _range_text(meta).replace("a number", "integer" if meta["kind"].startswith("int") else "number")
                if meta["kind"].startswith("auto"):
                    allowed = "auto or " + allowed
            elif (meta.get("kind") or "").startswith("bool"):
                allowed = "true / false"
            if (meta.get("kind") or "").endswith("?"):
                allowed = (allowed + " or null").strip()
            rows.append(f"| `{section}.{f.name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` "
                        f"| {allowed} | {meta['doc']} |")
    return "\n".join(rows)
