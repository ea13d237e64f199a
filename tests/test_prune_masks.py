"""Pruning masks vs hand computation; SparseGPT vs a naive OBS reference; reconstruction error."""

from __future__ import annotations

import pytest
import torch

from layercap.apply.prune import (
    exact_count,
    magnitude_scores,
    nm_mask,
    parse_structure,
    rowwise_mask,
    select_mask,
    sparsegpt_prune,
    wanda_scores,
)
from layercap.apply.prune.masks import check_nm_ratio
from layercap.errors import LayercapError

# 4 x 8 weight with distinct magnitudes near the cut-offs (hand-checked below)
W = torch.tensor([
    [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0],
    [8.0, 7.0, -6.0, 5.0, -4.0, 3.0, -2.0, 1.0],
    [0.5, 3.0, 2.5, 1.0, 0.1, 0.9, 0.2, 0.3],
    [9.0, 1.5, 1.25, 9.5, 2.2, 0.5, 2.25, 0.1],
])


def mask_of(rows: list[list[int]]) -> torch.Tensor:
    """Bool (4, 8) mask with True at the listed columns of each row."""
    m = torch.zeros(4, 8, dtype=torch.bool)
    for r, cols in enumerate(rows):
        m[r, cols] = True
    return m


# magnitude, layer-wise at 0.5: the 16 smallest |W| (cut between 2.25 and 2.5)
MAG_UNSTRUCTURED = mask_of([[0, 1], [6, 7], [0, 3, 4, 5, 6, 7], [1, 2, 4, 5, 6, 7]])
MAG_24 = mask_of([[0, 1, 4, 5], [2, 3, 6, 7], [0, 3, 4, 6], [1, 2, 5, 7]])
MAG_48 = mask_of([[0, 1, 2, 3], [4, 5, 6, 7], [0, 4, 6, 7], [1, 2, 5, 7]])
# Wanda with ||x|| = [1,1,1,1,4,4,4,4]: 4 smallest |W|*||x|| per row
NORMS_A = torch.tensor([1.0, 1, 1, 1, 4, 4, 4, 4])
WANDA_UNSTRUCTURED = mask_of([[0, 1, 2, 3], [1, 2, 3, 7], [0, 3, 4, 6], [1, 2, 5, 7]])
# Wanda 2:4 with ||x|| = [4,1,1,4,1,4,4,1]
NORMS_B = torch.tensor([4.0, 1, 1, 4, 1, 4, 4, 1])
WANDA_24 = mask_of([[1, 2, 4, 7], [1, 2, 4, 7], [0, 2, 4, 7], [1, 2, 5, 7]])


def test_exact_count_rounds_half_up():
    assert exact_count(0.5, 7) == 4
    assert exact_count(0.3, 8) == 2  # 2.4
    assert exact_count(0.7, 10) == 7  # 7.000000000000001 or 6.99999 must not matter
    assert exact_count(0.29, 100) == 29
    assert exact_count(0.0, 100) == 0
    assert [exact_count(r / 100, 100) for r in range(100)] == list(range(100))


def test_magnitude_masks_by_hand():
    s = magnitude_scores(W)
    assert torch.equal(select_mask(s, 0.5, None, per_row=False), MAG_UNSTRUCTURED)
    assert torch.equal(select_mask(s, 0.5, (2, 4), per_row=False), MAG_24)
    assert torch.equal(select_mask(s, 0.5, (4, 8), per_row=False), MAG_48)


def test_wanda_masks_by_hand():
    assert torch.equal(select_mask(wanda_scores(W, NORMS_A**2), 0.5, None, per_row=True), WANDA_UNSTRUCTURED)
    assert torch.equal(select_mask(wanda_scores(W, NORMS_B**2), 0.5, (2, 4), per_row=True), WANDA_24)
    # Wanda differs from magnitude here: the activation norms matter
    assert not torch.equal(WANDA_UNSTRUCTURED, MAG_UNSTRUCTURED)


def test_wanda_per_row_rounding():
    scores = torch.rand(5, 10, generator=torch.Generator().manual_seed(0))
    for ratio, per_row in ((0.3, 3), (0.25, 3), (0.24, 2), (0.55, 6)):  # 2.5 rounds up, 2.4 down
        m = rowwise_mask(scores, ratio)
        assert m.sum(1).tolist() == [per_row] * 5
        # and they are the smallest of each row
        for r in range(5):
            assert scores[r][m[r]].max() < scores[r][~m[r]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_structure_holds_in_every_group(n, m):
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(16, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    # pruned entries are the smallest of their group
    sg = scores.reshape(16, 64 // m, m)
    pruned_max = torch.where(groups, sg, torch.full_like(sg, -1)).amax(-1)
    kept_min = torch.where(~groups, sg, torch.full_like(sg, 2)).amin(-1)
    assert (pruned_max < kept_min).all()


def test_nm_errors():
    with pytest.raises(LayercapError, match="divisible by 4"):
        nm_mask(torch.rand(3, 6), 2, 4)
    with pytest.raises(LayercapError, match="incompatible with 2:4"):
        check_nm_ratio(0.4, (2, 4), "model.layers.0")
    check_nm_ratio(0.5, (2, 4), "x")
    check_nm_ratio(0.0, (2, 4), "x")  # 0 = leave dense
    assert parse_structure("unstructured") is None and parse_structure("4:8") == (4, 8)
    for bad in ("2-4", "4:2", "0:4", "a:b"):
        with pytest.raises(LayercapError):
            parse_structure(bad)


@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.5, 0.9])
def test_layerwise_counts_exact(ratio):
    scores = torch.randn(33, 47, generator=torch.Generator().manual_seed(2)).abs()
    scores[0, :10] = 0.5  # ties must not change the count
    assert int(select_mask(scores, ratio, None, per_row=False).sum()) == exact_count(ratio, 33 * 47)


# ---- SparseGPT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("structure,expected", [("unstructured", MAG_UNSTRUCTURED), ("2:4", MAG_24), ("4:8", MAG_48)])
def test_sparsegpt_identity_hessian_is_magnitude(structure, expected):
    """With H = I (inputs uncorrelated, unit variance) the OBS saliency is w^2 and no weight is updated."""
    new, mask = sparsegpt_prune(W, torch.eye(8), 0.5, parse_structure(structure))
    assert torch.equal(mask, expected)
    assert torch.equal(new[~mask], W[~mask]) and (new[mask] == 0).all()


def test_sparsegpt_diagonal_hessian_saliency():
    """Diagonal H: saliency w_j^2 * (H_jj + damp), chosen layer-wise; kept weights unchanged."""
    h = NORMS_A**2
    new, mask = sparsegpt_prune(W, torch.diag(h), 0.5)
    damp = 0.01 * h.mean()
    sal = W**2 * (h + damp)
    assert int(mask.sum()) == 16
    assert sal[mask].max() < sal[~mask].min()
    assert torch.allclose(new[~mask], W[~mask])


def naive_obs(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Optimal Brain Surgeon column by column with an explicit inverse (float64), for a given mask:
    zero the masked weights of column j, compensate on columns > j with row j of H^-1, then
    eliminate column j from H^-1. What SparseGPT's Cholesky + lazy-batch form computes."""
    Wd = weight.double().clone()
    H = hessian.double().clone()
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    for j in range(Wd.shape[1]):
        removed = torch.where(mask[:, j], Wd[:, j], torch.zeros_like(Wd[:, j]))
        Wd[:, j:] -= (removed / Hinv[j, j]).unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Wd


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) inputs with strongly correlated features (a random mixing of decaying-variance sources)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * torch.logspace(0, -2, d)
    mix = torch.randn(d, d, generator=g)
    return z @ mix + 0.5 * torch.randn(1, d, generator=g)


@pytest.mark.parametrize("structure,blocksize", [("unstructured", 4), ("unstructured", 128), ("2:4", 4), ("4:8", 8)])
def test_sparsegpt_matches_naive_obs(structure, blocksize):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 16, generator=g)
    x = correlated_inputs(200, 16)
    H = x.t() @ x / x.shape[0]
    new, mask = sparsegpt_prune(weight, H, 0.5, parse_structure(structure), blocksize=blocksize)
    assert int(mask.sum()) == 48
    ref = naive_obs(weight, H, mask)
    assert (new[mask] == 0).all()
    assert torch.allclose(new.double(), ref, rtol=1e-4, atol=1e-4), (new.double() - ref).abs().max()


def test_sparsegpt_exact_count_per_module():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(7, 300, generator=g)  # 3 column blocks of 128 (the last one short)
    x = correlated_inputs(400, 300)
    for ratio in (0.13, 0.5, 0.77):
        _, mask = sparsegpt_prune(weight, x.t() @ x / 400, ratio)
        assert int(mask.sum()) == exact_count(ratio, 7 * 300)


def test_sparsegpt_dead_inputs():
    """Columns whose input is always 0 (H_jj = 0) are zeroed and pruned first, as in the reference."""
    x = correlated_inputs(100, 8)
    x[:, 2] = 0
    H = x.t() @ x / 100
    H[2, :] = 0
    H[:, 2] = 0
    new, mask = sparsegpt_prune(W, H, 0.25)
    assert mask[:, 2].all() and (new[:, 2] == 0).all()
    assert int(mask.sum()) == 8


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstruction_beats_magnitude_and_wanda(structure):
    """||X W^T - X W'^T||^2 on correlated inputs: SparseGPT <= Wanda and <= magnitude at the same ratio."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 64, generator=g)
    x = correlated_inputs(512, 64, seed=6)
    H = x.t() @ x / x.shape[0]
    nm = parse_structure(structure)

    def error(w2: torch.Tensor) -> float:
        return float(((x @ weight.t() - x @ w2.t()) ** 2).sum())

    errors = {}
    for name, scores, per_row in (
        ("magnitude", magnitude_scores(weight), False),
        ("wanda", wanda_scores(weight, (x**2).mean(0)), True),
    ):
        mask = select_mask(scores, 0.5, nm, per_row)
        errors[name] = error(weight.masked_fill(mask, 0))
    new, mask = sparsegpt_prune(weight, H, 0.5, nm)
    errors["sparsegpt"] = error(new)
    assert int(mask.sum()) == 32 * 32
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    # not marginal: OBS reconstruction should remove a large share of the error
    assert errors["sparsegpt"] < 0.7 * min(errors["wanda"], errors["magnitude"]), errors


def test_sparsegpt_zero_ratio_is_identity_and_shapes_checked():
    new, mask = sparsegpt_prune(W, torch.eye(8), 0.0)
    assert torch.equal(new, W) and not mask.any()
    with pytest.raises(ValueError):
        sparsegpt_prune(W, torch.eye(7), 0.5)
    with pytest.raises(ValueError):
        wanda_scores(W, torch.ones(7))


def test_selection_equals_stable_sort_with_ties():
    """The O(n) selection gives exactly the stable-sort mask, ties included (lowest index first)."""
    g = torch.Generator().manual_seed(7)
    for trial in range(100):
        s = torch.randint(0, 4, (6, 12), generator=g).float()
        k = int(torch.randint(0, 73, (1,), generator=g))
        ref = torch.zeros(72, dtype=torch.bool)
        ref[torch.sort(s.reshape(-1), stable=True).indices[:k]] = True
        assert torch.equal(select_mask(s, k / 72, None, per_row=False), ref.reshape(6, 12)), trial
        ratio = trial / 100
        ref_rows = torch.zeros(6, 12, dtype=torch.bool)
        ref_rows.scatter_(1, torch.sort(s, dim=1, stable=True).indices[:, : exact_count(ratio, 12)], True)
        assert torch.equal(rowwise_mask(s, ratio), ref_rows), trial


def test_sparsegpt_precomputed_factor_is_the_same():
    from layercap.apply.prune import hessian_factor

    x = correlated_inputs(300, 16, seed=8)
    H = x.t() @ x / 300
    weight = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
    a = sparsegpt_prune(weight, H, 0.5)
    b = sparsegpt_prune(weight, H, 0.5, factor=hessian_factor(H))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
