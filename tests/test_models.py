import pytest
import torch

from layercap import LayercapError
from layercap.models import find_blocks, linear_weight
from layercap.models.tiny import FAMILIES, build_tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_blocks_with_linears(family):
    model, tok = build_tiny(family)
    blocks = find_blocks(model)
    assert len(blocks) == 4
    for block in blocks:
        assert block.linears
        for module in block.linears.values():
            w = linear_weight(module)
            assert w.dim() == 2
    ids = tok("hello world", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_blocks_regex_override_and_error():
    model, _ = build_tiny("llama")
    blocks = find_blocks(model, blocks_regex=r"model\.layers\.[02]")
    assert [b.name for b in blocks] == ["model.layers.0", "model.layers.2"]
    with pytest.raises(LayercapError, match="--blocks"):
        find_blocks(model, blocks_regex=r"nothing\.here")


def test_unknown_structure_says_how_to_fix():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(LayercapError, match="--blocks REGEX"):
        find_blocks(net)


def test_missing_model_is_a_clear_error(tmp_path):
    from layercap.models import load_model

    with pytest.raises(LayercapError, match="not found"):
        load_model(tmp_path / "missing")
