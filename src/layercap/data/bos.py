"""Whether a model's inputs start with a BOS token: the one decision every text path uses.

Calibration windows, perplexity windows and multiple-choice requests are tokenised without
special tokens; this module decides, once per model, whether a BOS token goes in front, the way
lm-evaluation-harness does:

* ``auto`` (default): BOS when the tokenizer adds one by default (encoding a text with
  ``add_special_tokens=True`` puts ``bos_token_id`` first: Llama 1/2, Mistral, Gemma), or when the
  model family requires one (Gemma 1/2/3, whatever its tokenizer says: the harness forces
  ``add_bos_token`` for every ``gemma*`` model type). GPT-2, OPT-as-loaded-here, Qwen and SmolLM2
  get none.
* ``always``: BOS on every input (an error if the tokenizer has no BOS token);
* ``never``: no BOS (the behaviour before this module existed).

How the BOS enters an input without changing what is scored (see :func:`put_bos`):

* a *window* (calibration, perplexity) keeps its length ``seqlen``; its first position, which is
  context and never a target (the target of position ``i`` is token ``i + 1``), holds the BOS
  instead of the first text token. The scored targets -- text tokens ``1 .. seqlen - 1`` of the
  window -- are the same tokens with and without BOS; only the one-token context of the first
  target changes (BOS instead of the text token before it).
* a *request* (context, continuation) gets the BOS in front of the context: the continuation
  tokens, the only ones scored, are unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from layercap.errors import LayercapError

POLICIES = ("auto", "always", "never")


def _model_type(model) -> str:
    config = getattr(model, "config", model)
    return str(getattr(config, "model_type", "") or "").lower()


def family_requires_bos(model=None, tokenizer=None) -> bool:
    """True for the Gemma families (trained always to see a BOS first). ``model``: a model or its
    config (``model_type`` is read); without one the tokenizer's class name decides."""
    if model is not None and _model_type(model):
        return "gemma" in _model_type(model)
    return tokenizer is not None and "gemma" in type(tokenizer).__name__.lower()


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when ``tokenizer(text)`` (default special tokens) starts with its BOS token and the
    same text without special tokens does not: the tokenizer's own convention."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)


@dataclass(frozen=True)
class BosChoice:
    """The decision for one model: ``add`` (put ``token_id`` first), the ``policy`` asked for and
    the ``reason`` (human-readable). Recorded in every artefact's metadata."""

    policy: str = "never"
    add: bool = False
    token_id: int | None = None
    reason: str = "no BOS requested"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise LayercapError(f"--bos {self.policy!r}: choose one of {', '.join(POLICIES)}.")
        if self.add and not isinstance(self.token_id, int):
            raise LayercapError(f"a BOS choice that adds a BOS needs an integer token id, got {self.token_id!r}.")
        if self.policy == "never" and self.add:
            raise LayercapError("--bos never cannot add a BOS token.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BosChoice":
        if not isinstance(d, dict):
            raise LayercapError(f"a BOS record must be a JSON object, got {type(d).__name__}.")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def hash_tag(self) -> bytes:
        """Bytes appended to a data hash when a BOS is added (empty otherwise, so hashes of
        no-BOS data are unchanged from earlier versions)."""
        return f"|bos={self.token_id}".encode() if self.add else b""


NO_BOS = BosChoice()


def resolve_bos(policy: str = "auto", tokenizer=None, model=None) -> BosChoice:
    """Decide BOS for ``model`` (or its config) and ``tokenizer`` under ``policy`` (module docstring)."""
    if policy not in POLICIES:
        raise LayercapError(f"--bos {policy!r}: choose one of {', '.join(POLICIES)}.")
    if policy == "never":
        return BosChoice("never", False, None, "--bos never")
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if policy == "always":
        if bos is None:
            raise LayercapError("--bos always: this tokenizer has no BOS token; use --bos auto or --bos never.")
        return BosChoice("always", True, int(bos), "--bos always")
    if family_requires_bos(model, tokenizer):
        if bos is None:
            raise LayercapError(f"model type {_model_type(model) or 'gemma'} needs a BOS token but its tokenizer has none; "
                                "fix the tokenizer config (bos_token) or pass --bos never.")
        return BosChoice("auto", True, int(bos), f"family {_model_type(model) or type(tokenizer).__name__} requires BOS")
    if tokenizer is not None and tokenizer_adds_bos(tokenizer):
        return BosChoice("auto", True, int(bos), "the tokenizer adds BOS by default")
    return BosChoice("auto", False, None, "the tokenizer adds no BOS by default")


def as_bos_choice(bos, tokenizer=None, model=None) -> BosChoice:
    """``bos`` as a :class:`BosChoice`: one already made, a policy string, ``True``/``False``
    (always/never) or ``None`` (never: the library's behaviour for callers that do not ask)."""
    if isinstance(bos, BosChoice):
        return bos
    if bos is None:
        return NO_BOS
    if isinstance(bos, bool):
        bos = "always" if bos else "never"
    return resolve_bos(str(bos), tokenizer, model)


def put_bos(window, choice: BosChoice):
    """Window (list of ids, or a tensor whose last axis is positions) with position 0 set to the
    BOS when ``choice.add`` (a copy; the input is not modified). Position 0 is never a target."""
    if not choice.add:
        return window
    if isinstance(window, list):
        return [choice.token_id] + window[1:] if window else window
    out = window.clone()
    out[..., 0] = choice.token_id
    return out


def prefix_bos(ids: list[int], choice: BosChoice) -> list[int]:
    """Context ids with the BOS in front when ``choice.add`` (not doubled if already first)."""
    if not choice.add or (ids and ids[0] == choice.token_id):
        return list(ids)
    return [choice.token_id] + list(ids)


def add_bos_argument(parser) -> None:
    """The ``--bos`` option of every command that feeds text to a model."""
    parser.add_argument("--bos", default="auto", choices=POLICIES,
                        help="BOS token at the start of every window/request: auto (default; as lm-evaluation-harness: "
                             "Gemma, or a tokenizer that adds BOS by default), always or never")
