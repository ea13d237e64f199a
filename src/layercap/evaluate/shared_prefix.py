"""Multiple-choice scoring for choices that differ only in their last token (one forward per item).

Instruction-format choices ("the correct answer is answer1" .. "answer4") share the context and
every continuation token but the last; scoring them together gives the same numbers as scoring
each choice separately (:func:`layercap.evaluate.multiple_choice.loglikelihoods`).
"""

from __future__ import annotations

import torch


def score_shared_prefix(model, tokenizer, task, batch_size: int = 8, progress: bool = True, bos="auto"):
    """``evaluate_task`` for items whose choices differ only in their last token, one forward per item.

    See :func:`shared_prefix_logliks`. Returns a ``TaskResult``.
    """
    from layercap.data.bos import as_bos_choice
    from layercap.evaluate.multiple_choice import task_result

    bos = as_bos_choice(bos, tokenizer, model)
    lls = shared_prefix_logliks(model, tokenizer, task, batch_size=batch_size, progress=progress, bos=bos)
    return task_result(task, lls, tokenizer, bos)


@torch.inference_mode()
def shared_prefix_logliks(model, tokenizer, task, batch_size: int = 8, progress: bool = True, bos="auto") -> list[list[float]]:
    """Per item, the summed continuation log-probability (nats) of every choice, in choice order.

    Instruction-format choices ("the correct answer is answer1" .. "answer4") share the context
    and every continuation token but the last, so the log-likelihood of choice i is
    (shared continuation log-prob) + log p(last token i | shared prefix): the same numbers as
    scoring each choice separately (:func:`layercap.evaluate.multiple_choice.loglikelihoods`,
    same tokenisation via ``encode_pair``), for 1/n_choices of the compute. Items that do not
    have this form are scored choice by choice with that function.
    """
    from tqdm.auto import tqdm

    from layercap.data.bos import as_bos_choice
    from layercap.evaluate.multiple_choice import encode_pair, loglikelihoods

    bos = as_bos_choice(bos, tokenizer, model)

    dev = next(model.parameters()).device
    cfg = getattr(model, "config", None)
    max_len = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)
    shared, other = [], []  # shared: (item index, input ids, n shared continuation tokens, last-token ids)
    for i, it in enumerate(task.items):
        enc = [encode_pair(tokenizer, c, k, bos) for c, k in it.requests()]
        ctx, conts = enc[0][0], [k for _, k in enc]
        same = all(c == ctx for c, _ in enc) and len({len(k) for k in conts}) == 1 and len(conts[0]) >= 1
        same = same and all(k[:-1] == conts[0][:-1] for k in conts)
        if same and len(set(k[-1] for k in conts)) == len(conts):
            seq = (ctx + conts[0])[-(max_len + 1):][:-1]
            if bos.add and seq[0] != bos.token_id:  # cut from the left: the BOS stays first
                seq = [bos.token_id] + seq[1:]
            shared.append((i, seq, len(conts[0]) - 1, [k[-1] for k in conts]))
        else:
            other.append(i)
    lls: dict[int, list[float]] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shared.sort(key=lambda r: -len(r[1]))
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(shared), desc=f"{task.name} (shared prefix)", unit="item", disable=not progress, leave=False)
    try:
        for s in range(0, len(shared), batch_size):
            rows = shared[s:s + batch_size]
            width = len(rows[0][1])
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (_, seq, _, _) in enumerate(rows):
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            for r, (i, seq, n_shared, lasts) in enumerate(rows):
                n = len(seq)
                lp = torch.log_softmax(logits[r, n - n_shared - 1:n].float(), dim=-1)  # (n_shared + 1, vocab)
                cont = seq[n - n_shared:]  # the shared continuation tokens (inputs after the context)
                common = float(lp[torch.arange(n_shared), torch.tensor(cont, dtype=torch.long)].sum()) if n_shared else 0.0
                lls[i] = [common + float(lp[-1, t]) for t in lasts]
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    if other:
        reqs, spans = [], []
        for i in other:
            r = task.items[i].requests()
            spans.append((i, len(reqs), len(reqs) + len(r)))
            reqs.extend(r)
        flat = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, progress=progress, desc=task.name, bos=bos)
        for i, a, b in spans:
            lls[i] = flat[a:b]
    return [lls[i] for i in range(len(task.items))]
