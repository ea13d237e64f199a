"""The registry of score methods: name -> callable producing zeta2 per parameter group.

A method is ``fn(model, groups, calib, options) -> np.ndarray`` of shape (K,), float64, one
value per :class:`~layercap.scores.groups.ParamGroup` (``calib`` is a
:class:`~layercap.data.calibration.CalibrationSet` or None when ``needs_data`` is False).

Built-in curvature methods (gradnorm, diag, kfac, ekfac, exact) register themselves when
``layercap.scores.methods`` / ``layercap.scores.exact`` are imported; their calibrated variants
(diag-tr, kfac-tr, ekfac-tr, exact-tr) and measured gains (gain = gain-kfac, gain-diag, ...) when
``layercap.scores.trust_region`` is. Baseline score sources live in optional modules
(``heavytail``, ``owl``, ``influence``) that call :func:`register` at import time; they are
imported lazily the first time a name is looked up, and a missing module is tolerated.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from layercap.errors import LayercapError

FISHER_KINDS = ("empirical", "true")
DAMPING_MODES = ("relative", "absolute")

# modules that register extra methods on import (missing ones are skipped)
PLUGIN_MODULES = (
    "layercap.scores.methods",
    "layercap.scores.exact",
    "layercap.scores.trust_region",
    "layercap.scores.heavytail",
    "layercap.scores.owl",
    "layercap.scores.influence",
)


@dataclass
class ScoreOptions:
    """Options shared by every method.

    batch_size: windows per micro-batch (memory knob; results do not depend on it).
    damping: rho (relative mode: lambda_k = rho * trace(C_k) / dim_k) or lambda (absolute).
    fisher: "empirical" (observed next tokens) or "true" (labels sampled from the model, seeded).
    checkpoint_dir / checkpoint_every / resume: resumable statistics passes (see engine).
    max_factor_gb: kfac/ekfac statistics budget (GiB). Groups are streamed in chunks whose
    float32 factors, gradients and diagonals fit it, one pass over the data per chunk (each
    chunk's factors are eigendecomposed, scored and freed before the next). None: all groups in
    one pass on CPU; on CUDA, 60% of the free device memory when the run starts.
    cg_tol / cg_max_iter: conjugate-gradient stopping rule of the ``exact`` method
    (relative residual ||r|| / ||g||). trace_samples: sampled-label draws per window used to
    estimate trace(C_k) for ``exact`` with relative damping.
    tr_max_evals / tr_factor: the ``-tr`` and ``gain`` methods' Levenberg-Marquardt search (forward
    passes per block, and the factor lambda grows or shrinks by; see scores/trust_region.py).
    extra: method-specific inputs (e.g. influence's train/validation data).
    """

    batch_size: int = 4
    damping: float = 0.1
    damping_mode: str = "relative"
    fisher: str = "empirical"
    seed: int = 0
    device: str = "cpu"
    progress: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    resume: bool = False
    max_factor_gb: float | None = None
    cg_tol: float = 1e-6
    cg_max_iter: int = 100
    trace_samples: int = 1
    tr_max_evals: int = 6
    tr_factor: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise LayercapError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}.")
        if not (self.damping > 0 and np.isfinite(self.damping)):
            raise LayercapError(f"--damping must be a finite number > 0, got {self.damping!r}.")
        if self.damping_mode not in DAMPING_MODES:
            raise LayercapError(f"--damping-mode must be one of {DAMPING_MODES}, got {self.damping_mode!r}.")
        if self.fisher not in FISHER_KINDS:
            raise LayercapError(f"--fisher must be one of {FISHER_KINDS}, got {self.fisher!r}.")
        if self.checkpoint_every < 1:
            raise LayercapError(f"checkpoint_every must be >= 1, got {self.checkpoint_every!r}.")
        if self.max_factor_gb is not None and not (self.max_factor_gb > 0 and np.isfinite(self.max_factor_gb)):
            raise LayercapError(f"--max-factor-gb must be a finite number > 0, got {self.max_factor_gb!r}.")
        if not (self.cg_tol > 0) or self.cg_max_iter < 1 or self.trace_samples < 1:
            raise LayercapError("cg_tol must be > 0 and cg_max_iter, trace_samples >= 1.")
        if not isinstance(self.tr_max_evals, int) or self.tr_max_evals < 1:
            raise LayercapError(f"--tr-max-evals must be an integer >= 1, got {self.tr_max_evals!r}.")
        if not (self.tr_factor > 1 and np.isfinite(self.tr_factor)):
            raise LayercapError(f"--tr-factor must be a finite number > 1, got {self.tr_factor!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = sorted(self.extra)  # inputs may not be JSON-able; record their names
        return d


ScoreFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class ScoreMethod:
    name: str
    fn: ScoreFn
    needs_data: bool = True
    description: str = ""

    def __call__(self, model, groups, calib, options: ScoreOptions) -> np.ndarray:
        return self.fn(model, groups, calib, options)


METHODS: dict[str, ScoreMethod] = {}


def register(name: str, fn: ScoreFn, needs_data: bool = True, description: str = "") -> ScoreMethod:
    """Add (or replace) method ``name``; returns the registered :class:`ScoreMethod`."""
    method = ScoreMethod(name, fn, needs_data, description)
    METHODS[name] = method
    return method


def _load_plugins() -> None:
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency inside the module: surface it
                raise


def available_methods() -> list[str]:
    _load_plugins()
    return sorted(METHODS)


def get_method(name: str) -> ScoreMethod:
    if name not in METHODS:
        _load_plugins()
    if name not in METHODS:
        raise LayercapError(f"unknown score method {name!r}; available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
