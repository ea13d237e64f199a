"""Layer scores zeta_k^2 = g_k^T (C_k + lambda_k I)^-1 g_k (SPEC section 1).

``score_model(model, method, calib, ...) -> LayerScores`` is the entry point; methods live in a
registry (``METHODS``, ``register``) that baseline score sources extend.
"""

from layercap.scores.api import score_model
from layercap.scores.groups import ParamGroup, param_groups
from layercap.scores.registry import METHODS, ScoreMethod, ScoreOptions, available_methods, get_method, register

__all__ = [
    "score_model",
    "ParamGroup",
    "param_groups",
    "METHODS",
    "ScoreMethod",
    "ScoreOptions",
    "available_methods",
    "get_method",
    "register",
]

from layercap.scores import methods as _builtin_methods  # noqa: E402,F401  (registers gradnorm, diag, kfac, ekfac)
from layercap.scores import exact as _exact_method  # noqa: E402,F401  (registers exact)
from layercap.scores import trust_region as _trust_region  # noqa: E402,F401  (registers the -tr methods and gain)
