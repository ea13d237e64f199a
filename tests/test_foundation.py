import json

import numpy as np
import pytest

from layercap import LayercapError, LayerScore, LayerScores
from layercap.io import atomic_write_json


def _scores(n=4):
    return LayerScores([LayerScore(f"l{i}", float(i + 1), 10 * (i + 1)) for i in range(n)], method="kfac", metadata={"model": "m"})


def test_scores_round_trip_json_and_csv(tmp_path):
    s = _scores()
    s.save(tmp_path / "s.json")
    s.save(tmp_path / "s.csv")
    a = LayerScores.load(tmp_path / "s.json")
    b = LayerScores.load(tmp_path / "s.csv")
    assert a.names == b.names == s.names
    np.testing.assert_array_equal(a.zeta2, s.zeta2)
    np.testing.assert_array_equal(b.params, s.params)
    assert a.method == "kfac" and a.metadata == {"model": "m"}
    np.testing.assert_allclose(a.q.sum(), 1.0)


@pytest.mark.parametrize(
    "layer, fragment",
    [
        ({"name": "a", "zeta2": float("nan"), "params": 1}, "zeta2"),
        ({"name": "a", "zeta2": -1.0, "params": 1}, "zeta2"),
        ({"name": "a", "zeta2": 1.0, "params": 0}, "params"),
        ({"name": "a", "zeta2": 1.0}, "'params'"),
        ({"name": "", "zeta2": 1.0, "params": 1}, "name"),
        ({"name": "a", "zeta2": 1.0, "params": 1, "colour": 2}, "unknown field"),
    ],
)
def test_malformed_scores_name_the_field(tmp_path, layer, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"layers": [layer, {"name": "b", "zeta2": 1.0, "params": 1}]}).replace("NaN", "NaN"))
    with pytest.raises(LayercapError, match=fragment):
        LayerScores.load(path)


def test_all_zero_scores_rejected():
    with pytest.raises(LayercapError, match="every zeta2 is 0"):
        LayerScores([LayerScore("a", 0.0, 1), LayerScore("b", 0.0, 1)])


def test_missing_scores_file_says_how_to_make_one(tmp_path):
    with pytest.raises(LayercapError, match="layercap score"):
        LayerScores.load(tmp_path / "nope.json")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"a": float("nan")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
