"""Where a loaded model came from: a label kept on the module object (never in its config)."""

from __future__ import annotations


def set_model_source(model, label: str) -> None:
    """Record where ``model`` came from. Kept on the module object, not on ``model.config``,
    so that it never leaks into a saved ``config.json``."""
    model.__dict__["_layercap_source"] = str(label)


def model_source(model, default: str | None = None) -> str | None:
    """The label recorded by :func:`set_model_source` (or ``default``: the class name if None)."""
    label = model.__dict__.get("_layercap_source")
    if label is None:
        config = getattr(model, "config", None)
        label = default if default is not None else (getattr(config, "_name_or_path", None) or type(model).__name__)
    return label
