"""Parameter groups: the blocks theta_k that layer scores are computed for (SPEC section 1).

Three granularities, all built on :func:`layercap.models.find_blocks`:

* ``"block"`` (default): one group per decoder block holding all its trainable parameters
  (with ``modules_regex``: only the parameters of the matching Linear modules);
* ``"module"``: one group per Linear/Conv1D module of every block (its weight and bias);
* a dict ``{group_name: regex}``: user groups over qualified parameter names
  (``re.search``); a parameter joins the first group whose regex matches it, so the groups are
  disjoint. Any parameter of the model may be grouped (embeddings included).

``ParamGroup.linears`` maps qualified module names to the Linear/Conv1D modules whose weight
lies in the group: K-FAC style methods treat those with Kronecker factors and every other
parameter of the group with the diagonal Fisher.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from layercap.errors import LayercapError
from layercap.models import find_blocks
from layercap.models.blocks import LINEAR_TYPES

GRANULARITIES = ("block", "module")


@dataclass
class ParamGroup:
    """One block theta_k: ``params`` are (qualified name, parameter) pairs in model order."""

    name: str
    params: list[tuple[str, nn.Parameter]]
    linears: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for _, p in self.params)


def _linear_params(qualified: str, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out = [(f"{qualified}.weight", module.weight)]
    if getattr(module, "bias", None) is not None:
        out.append((f"{qualified}.bias", module.bias))
    return out


def param_groups(
    model: nn.Module,
    granularity: str | dict[str, str] = "block",
    blocks_regex: str | None = None,
    modules_regex: str | None = None,
) -> list[ParamGroup]:
    """The model's parameter groups at ``granularity`` (see module docstring), in model order."""
    if isinstance(granularity, dict):
        return _user_groups(model, granularity)
    if granularity not in GRANULARITIES:
        raise LayercapError(f"unknown granularity {granularity!r}; use 'block', 'module' or a groups file (name -> regex).")
    blocks = find_blocks(model, blocks_regex=blocks_regex, modules_regex=modules_regex)
    groups: list[ParamGroup] = []
    for block in blocks:
        linears = {f"{block.name}.{rel}": m for rel, m in block.linears.items()}
        if granularity == "module":
            for qualified, module in linears.items():
                groups.append(ParamGroup(qualified, _linear_params(qualified, module), {qualified: module}))
            continue
        if modules_regex:
            params = [np for q, m in linears.items() for np in _linear_params(q, m)]
        else:
            params = block.named_parameters()
        groups.append(ParamGroup(block.name, params, linears))
    return groups


def _user_groups(model: nn.Module, spec: dict[str, str]) -> list[ParamGroup]:
    if not spec:
        raise LayercapError("the groups file is empty; give at least one {\"name\": \"regex\"} entry.")
    patterns = {}
    for name, regex in spec.items():
        if not isinstance(name, str) or not name or not isinstance(regex, str):
            raise LayercapError(f"groups file: entry {name!r}: {regex!r} must map a non-empty name to a regex string.")
        try:
            patterns[name] = re.compile(regex)
        except re.error as exc:
            raise LayercapError(f"groups file: regex {regex!r} of group {name!r} is invalid ({exc}).") from exc
    members: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in spec}
    for pname, param in model.named_parameters():
        for gname, pattern in patterns.items():
            if pattern.search(pname):
                members[gname].append((pname, param))
                break
    empty = [g for g, ps in members.items() if not ps]
    if empty:
        sample = ", ".join(n for n, _ in list(model.named_parameters())[:4])
        raise LayercapError(
            f"groups {empty} match no parameter (or only parameters an earlier group took). "
            f"Parameter names look like: {sample}."
        )
    weight_owner = {id(m.weight): (n, m) for n, m in model.named_modules() if n and isinstance(m, LINEAR_TYPES)}
    groups = []
    for gname, params in members.items():
        linears = {}
        ids = {id(p) for _, p in params}
        for _, p in params:
            owner = weight_owner.get(id(p))
            # a Linear gets Kronecker treatment only if its bias (when any) is in the group too
            if owner is not None and (getattr(owner[1], "bias", None) is None or id(owner[1].bias) in ids):
                linears[owner[0]] = owner[1]
        groups.append(ParamGroup(gname, params, linears))
    return groups
