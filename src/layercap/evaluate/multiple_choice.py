"""Zero-shot multiple-choice accuracy by log-likelihood, as lm-evaluation-harness computes it.

For every choice the request ``(context, continuation)`` is scored by the summed log-probability
(nats) of the continuation tokens given the context. Tokenisation follows the harness's
``_encode_pair``: trailing spaces of the context move to the continuation, ``context +
continuation`` is encoded as a whole and the continuation tokens are the tokens after
``len(encode(context))`` (so a merge across the boundary is attributed to the continuation). A BOS
goes in front of every context when the model's inputs start with one (``bos``, decided by
:mod:`layercap.data.bos` as the harness does: Gemma, or a tokenizer that adds BOS by default); the
continuation tokens -- the only ones scored -- are the same either way. An empty context becomes
the BOS (or EOS) token. Sequences longer than ``max_length`` are cut from the left (keeping the
BOS first when there is one).

Metrics per item (harness ``process_results``):

* ``acc``      = [argmax_i loglik_i == label]
* ``acc_norm`` = [argmax_i loglik_i / len(choice_i) == label], with ``len`` the number of
  characters of the choice text *without* its leading delimiter space (the harness's
  ``float(len(choice))`` of ``doc_to_choice``; its docs call it byte-length normalisation, the code
  counts ``str`` characters -- the same for ASCII).

Ties go to the first choice (``numpy.argmax``). Speed: when all choices of an item share the
context, the context runs once and its KV cache is repeated for a batch of the continuations
(``share_context``); other requests are sorted by length and batched, right-padded, and the LM
head only runs on the positions that are scored (``logits_to_keep``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from layercap.data.bos import NO_BOS, BosChoice, as_bos_choice, prefix_bos
from layercap.data.tasks import MCItem, Task
from layercap.errors import LayercapError
from layercap.io import atomic_write_json

SCHEMA = "layercap.task_eval/v1"


@dataclass(frozen=True)
class TaskResult:
    """Accuracy of one task. ``acc``/``acc_norm`` in [0, 1]; ``*_stderr``: binomial standard error
    (sample std / sqrt(n), as the harness); ``chance``: uniform-guess accuracy."""

    name: str
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int
    chance: float
    source: str
    sha256: str
    template: str = ""
    bos: dict | None = None
    # answer-token NLL of the correct choice, nats per continuation token (sum over items of
    # -log p(correct continuation) / its token count summed over items): a continuous metric
    nll: float | None = None
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        # an undefined standard error (n < 2) is NaN here and null in JSON (which has no NaN)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a {SCHEMA} record (schema {d.get('schema')!r}).")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("acc_stderr", "acc_norm_stderr"):
            if fields.get(k, 0.0) is None:
                fields[k] = float("nan")
        return cls(**fields)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())


def choice_length(choice: str) -> int:
    """Characters of a choice without its leading delimiter space (the acc_norm denominator)."""
    return max(len(choice[1:] if choice.startswith(" ") else choice), 1)


def item_metrics(logliks: list[float], item: MCItem) -> tuple[float, float]:
    """(acc, acc_norm) of one item from the choices' log-likelihoods."""
    ll = np.asarray(logliks, dtype=np.float64)
    lengths = np.asarray([choice_length(c) for c in item.choices], dtype=np.float64)
    return float(np.argmax(ll) == item.label), float(np.argmax(ll / lengths) == item.label)


def encode_pair(tokenizer, context: str, continuation: str, bos: BosChoice = NO_BOS) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness's ``_encode_pair`` (see module docstring);
    with ``bos.add`` the context ids start with the BOS."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if not context:
        prefix = bos.token_id if bos.add else tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], enc(continuation)
    whole, ctx = enc(context + continuation), enc(context)
    return prefix_bos(ctx, bos), whole[len(ctx) :]


def _max_length(model, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or default)


def _logits(model, input_ids: torch.Tensor, keep: int, **kwargs) -> torch.Tensor:
    """Logits of the last ``keep`` positions (skipping the LM head elsewhere when the model
    supports ``logits_to_keep``; wrappers that do not are given the full sequence)."""
    try:
        out = model(input_ids=input_ids, logits_to_keep=keep, **kwargs)
    except TypeError:
        out = model(input_ids=input_ids, **kwargs)
    return out, out.logits[:, -keep:]


def _encode(tokenizer, requests: list[tuple[str, str]], max_len: int, bos: BosChoice = NO_BOS) -> list[tuple[list[int], list[int]]]:
    encoded = []
    for ctx, cont in requests:
        c, k = encode_pair(tokenizer, ctx, cont, bos)
        if not k:
            raise LayercapError(f"continuation {cont!r} encodes to no tokens; every choice needs text.")
        encoded.append((c, k))
    return encoded


def _inputs(context: list[int], cont: list[int], max_len: int, bos: BosChoice) -> list[int]:
    """Model inputs of one request (``context + cont`` less its last token), cut from the left to
    ``max_len``; a leading BOS stays first (the cut falls after it)."""
    ids = (context + cont)[:-1]
    if len(ids) <= max_len:
        return ids
    if bos.add and context and context[0] == bos.token_id:
        return [bos.token_id] + ids[len(ids) - (max_len - 1) :]
    return ids[-max_len:]


def _plain(model, encoded, max_len: int, batch_size: int, dev, pad: int, bar, bos: BosChoice = NO_BOS) -> list[float]:
    """Each (context, continuation) as its own right-padded row, longest first."""
    for c, k in encoded:
        if len(k) > max_len - (1 if bos.add else 0):
            raise LayercapError(f"a continuation of {len(k)} tokens does not fit the model's context of {max_len}; shorten the choices.")
    seqs = [(_inputs(c, k, max_len, bos), k) for c, k in encoded]  # inputs; targets shifted by one
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = [0.0] * len(seqs)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = len(seqs[idx[0]][0])
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
        # right padding: real positions never attend to the padding after them (causal), so no mask
        keep = width - min(len(seqs[i][0]) - len(seqs[i][1]) for i in idx)
        _, logits = _logits(model, ids.to(dev), keep)
        for row, i in enumerate(idx):
            seq, cont = seqs[i]
            n = len(cont)
            # positions len(seq)-n .. len(seq)-1 predict the n continuation tokens
            lo = keep - (width - (len(seq) - n))
            lp = torch.log_softmax(logits[row, lo : lo + n].float(), dim=-1)
            out[i] = float(lp.gather(1, torch.tensor(cont, device=lp.device)[:, None]).sum())
        bar.update(len(idx))
    return out


def _shared(model, ctx: list[int], conts: list[list[int]], dev, pad: int) -> list[float] | None:
    """All continuations of one context: the context runs once (KV cache), then the
    continuations run as one batch on the repeated cache. ``None`` if the model's cache cannot
    be repeated (the caller falls back to ``_plain``)."""
    out, last = _logits(model, torch.tensor([ctx], device=dev), 1, use_cache=True)
    first = torch.log_softmax(last[0, -1].float(), dim=-1)
    scores = [float(first[k[0]]) for k in conts]
    width = max(len(k) for k in conts) - 1
    if width == 0:
        return scores
    past = getattr(out, "past_key_values", None)
    if past is None or not hasattr(past, "batch_repeat_interleave"):
        return None
    past.batch_repeat_interleave(len(conts))
    ids = torch.full((len(conts), width), pad, dtype=torch.long)
    for row, k in enumerate(conts):
        ids[row, : len(k) - 1] = torch.tensor(k[:-1])
    _, logits = _logits(model, ids.to(dev), width, past_key_values=past, use_cache=True)
    lp = torch.log_softmax(logits.float(), dim=-1)
    for row, k in enumerate(conts):
        if len(k) > 1:
            scores[row] += float(lp[row, torch.arange(len(k) - 1), torch.tensor(k[1:], device=lp.device)].sum())
    return scores


def loglikelihoods(
    model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8, device=None, progress: bool = True, desc: str = "mc",
    bos="auto",
) -> list[float]:
    """Summed continuation log-probability (nats) of each ``(context, continuation)`` request,
    each request scored independently (right-padded batches of ``batch_size`` rows). ``bos``:
    auto/always/never or a :class:`~layercap.data.bos.BosChoice`."""
    return _score_groups(model, tokenizer, [requests], batch_size, device, progress, desc, share=False, bos=bos)[0]


@torch.inference_mode()
def _score_groups(model, tokenizer, groups, batch_size, device, progress, desc, share: bool, bos="auto") -> list[list[float]]:
    """Log-likelihoods of groups of requests; with ``share`` a group whose requests all have the
    same context tokens is scored with one context pass (``_shared``)."""
    if batch_size < 1:
        raise LayercapError(f"--batch-size must be >= 1, got {batch_size}.")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    max_len = _max_length(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    choice = as_bos_choice(bos, tokenizer, model)
    encoded = [_encode(tokenizer, g, max_len, choice) for g in groups]
    results: list[list[float] | None] = [None] * len(groups)
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(g) for g in groups), desc=desc, unit="req", disable=not progress, leave=False)
    try:
        for gi, enc in enumerate(encoded):
            ctxs = {tuple(c) for c, _ in enc}
            if share and len(ctxs) == 1 and len(enc[0][0]) + max(len(k) for _, k in enc) <= max_len:
                results[gi] = _shared(model, enc[0][0], [k for _, k in enc], dev, pad)
                if results[gi] is not None:
                    bar.update(len(enc))
        rest = [(gi, j) for gi, r in enumerate(results) if r is None for j in range(len(encoded[gi]))]
        flat = _plain(model, [encoded[gi][j] for gi, j in rest], max_len, batch_size, dev, pad, bar, choice) if rest else []
        for (gi, j), v in zip(rest, flat):
            if results[gi] is None:
                results[gi] = [0.0] * len(encoded[gi])
            results[gi][j] = v
    finally:
        bar.close()
        model.train(was_training)
    return results


def _stderr(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def evaluate_task(
    model, tokenizer, task: Task, batch_size: int = 8, device=None, progress: bool = True, share_context: bool = True,
    bos="auto",
) -> TaskResult:
    """Zero-shot ``acc``/``acc_norm`` of ``model`` on every item of ``task``.

    ``share_context``: score the choices of an item that share a context with one context pass
    (KV cache) -- same numbers up to float rounding, several times fewer tokens; items with
    per-choice contexts (WinoGrande) are batched as independent requests. ``bos``: see
    :func:`loglikelihoods`."""
    choice = as_bos_choice(bos, tokenizer, model)
    groups = [it.requests() for it in task.items]
    scores = _score_groups(model, tokenizer, groups, batch_size, device, progress, task.name, share=share_context, bos=choice)
    return task_result(task, scores, tokenizer, choice)


def task_result(task: Task, logliks: list[list[float]], tokenizer, bos: BosChoice) -> TaskResult:
    """The TaskResult of ``task`` from every item's per-choice log-likelihoods (nats)."""
    accs, norms = [], []
    nll, tokens = 0.0, 0
    for it, lls in zip(task.items, logliks):
        acc, norm = item_metrics(lls, it)
        accs.append(acc)
        norms.append(norm)
        context, continuation = it.requests()[it.label]
        nll -= lls[it.label]
        tokens += len(encode_pair(tokenizer, context, continuation, bos)[1])
    n = len(accs)
    return TaskResult(
        name=task.name,
        acc=sum(accs) / n,
        acc_norm=sum(norms) / n,
        acc_stderr=_stderr(accs),
        acc_norm_stderr=_stderr(norms),
        n=n,
        chance=task.chance,
        source=task.source,
        sha256=task.sha256,
        template=task.template,
        bos=bos.to_dict(),
        nll=nll / tokens if tokens else None,
    )
