"""Round trip and validation of the program records (allocation, ratios, transfer)."""

import json
import subprocess
import sys

import pytest

from layercap.errors import LayercapError
from layercap.programs.records import (
    AllocatedLayer,
    Allocation,
    PruningRatios,
    RatioLayer,
    TransferLayer,
    TransferResult,
)


def _alloc(integer=True):
    layers = [AllocatedLayer(f"l{i}", (i + 1) if integer else i + 0.5, 1.0 + i, 0.25) for i in range(4)]
    return Allocation("mdl", 20.0, "experts", integer, layers, mu=0.3, binds=True, spent=20.0,
                      gap=0.0 if integer else None, metadata={"beta": 0.9})


def _ratios():
    layers = [RatioLayer(f"l{i}", 0.4 + 0.05 * i, 100 * (i + 1)) for i in range(4)]
    return PruningRatios("mdl", 0.5, "exact", layers, achieved=0.5, nu=-3.0, clipped=1, warnings=["w"], metadata={"eta": 1})


def _transfer():
    layers = [TransferLayer(f"l{i}", 0.25, 0.2 + 0.1 * (i % 2), 1.0, 2.0) for i in range(4)]
    return TransferResult("allocation", 0.01, 0.5, True, True, [], {"m": 1.0, "L": 2.0, "L_q": 3.0}, 0.04,
                          -1.0, -1.01, layers, {"src": "a"})


@pytest.mark.parametrize("integer", [True, False])
def test_allocation_round_trip(tmp_path, integer):
    a = _alloc(integer)
    a.save(tmp_path / "a.json")
    b = Allocation.load(tmp_path / "a.json")
    assert b.to_dict() == a.to_dict()
    assert b.names == ["l0", "l1", "l2", "l3"]
    assert b.counts() == a.counts()
    if integer:
        assert all(isinstance(v, int) for v in b.counts().values())
    a.save(tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_text().splitlines()[0] == "name,n,cost,q"


def test_ratios_round_trip_and_uniform(tmp_path):
    r = _ratios()
    r.save(tmp_path / "r.json")
    assert PruningRatios.load(tmp_path / "r.json").to_dict() == r.to_dict()
    u = PruningRatios.uniform(["a", "b"], [10, 30], 0.5)
    assert u.ratios() == {"a": 0.5, "b": 0.5} and u.achieved == 0.5 and u.rule == "uniform"
    u.save(tmp_path / "u.csv")
    assert (tmp_path / "u.csv").read_text().splitlines()[1] == "a,0.5,10"
    with pytest.raises(LayercapError, match="sparsity"):
        PruningRatios.uniform(["a"], [1], 1.5)


def test_transfer_round_trip(tmp_path):
    t = _transfer()
    t.save(tmp_path / "t.json")
    assert TransferResult.load(tmp_path / "t.json").to_dict() == t.to_dict()


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(schema="layercap.ratios/v1"), "schema"),
        (lambda d: d.update(unit="parsecs"), "unit"),
        (lambda d: d["layers"][1].update(n=1.5), "whole number"),
        (lambda d: d["layers"][1].update(cost=0), "cost"),
        (lambda d: d["layers"][1].update(name="l0"), "twice"),
        (lambda d: d.pop("spent"), "spent"),
        (lambda d: d.update(binds="yes"), "binds"),
        (lambda d: d.update(layers=[]), "layers"),
    ],
)
def test_allocation_malformed_names_field(tmp_path, mutate, fragment):
    d = _alloc().to_dict()
    mutate(d)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(LayercapError, match=fragment):
        Allocation.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d["layers"][0].update(ratio=1.2), "ratio"),
        (lambda d: d["layers"][0].update(params=0), "params"),
        (lambda d: d.update(mode="most"), "mode"),
        (lambda d: d.update(warnings="x"), "warnings"),
        (lambda d: d.update(sparsity=None), "sparsity"),
    ],
)
def test_ratios_malformed_names_field(tmp_path, mutate, fragment):
    d = _ratios().to_dict()
    mutate(d)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(LayercapError, match=fragment):
        PruningRatios.load(tmp_path / "bad.json")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(LayercapError, match="does not exist"):
        Allocation.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(LayercapError, match="not valid JSON"):
        PruningRatios.load(tmp_path / "x.json")


def test_programs_do_not_import_torch():
    code = "import sys, layercap.programs, layercap.programs.rules, layercap.programs.transfer; " \
           "import layercap.commands.allocate, layercap.commands.prune_ratios, layercap.commands.transfer; " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
