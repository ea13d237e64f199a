"""The checked input layer and the output rule of layercap.io (issue 15)."""

from __future__ import annotations

import json
import math

import pytest

from layercap import io as lio
from layercap.errors import LayercapError


def test_text_utf8_bom_binary_and_folder(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9\r\nx")
    assert lio.read_text_file(f) == "caf\u00e9\r\nx"  # BOM dropped, content exact
    f.write_bytes(b"abc\x00def")
    with pytest.raises(LayercapError, match=r"a\.txt: binary content \(a NUL byte at byte offset 3\)"):
        lio.read_text_file(f)
    f.write_bytes(b"abcd\xe9xyz")
    with pytest.raises(LayercapError, match=r"not UTF-8 text \(invalid byte at byte offset 4\)") as exc:
        lio.read_text_file(f)
    assert "\\xe9" not in str(exc.value) and "\ufffd" not in str(exc.value)
    f.write_bytes(b"\xef\xbb\xbf\x00")
    with pytest.raises(LayercapError, match="byte offset 3"):  # offsets count the BOM
        lio.read_text_file(f)
    with pytest.raises(LayercapError, match="is a folder, not a file"):
        lio.read_text_file(tmp_path, "--data")
    with pytest.raises(LayercapError, match="does not exist"):
        lio.read_text_file(tmp_path / "nope", "--data")


def test_json_jsonl_csv_yaml(tmp_path):
    j = tmp_path / "a.json"
    j.write_text('{"a": 1,\n "b": }')
    with pytest.raises(LayercapError, match="line 2 column"):
        lio.read_json(j)
    j.write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(LayercapError, match="JSON lines"):
        lio.read_json(j)
    j.write_text('{"x": NaN}')
    assert math.isnan(lio.read_json(j)["x"])  # parsed, so validators can name the field
    jl = tmp_path / "a.jsonl"
    jl.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n')
    assert lio.read_jsonl(jl) == [{"a": 1}, {"a": 2}]
    jl.write_text('{\n"a": 1\n}\n')
    with pytest.raises(LayercapError, match="several lines: use a .json file"):
        lio.read_jsonl(jl)
    c = tmp_path / "a.csv"
    c.write_bytes(b"\xef\xbb\xbfname , cost\na,1\nb,2\n")
    assert lio.read_csv(c, required=("name", "cost")) == [{"name": "a", "cost": "1"}, {"name": "b", "cost": "2"}]
    c.write_text("name,cost\na\n")
    with pytest.raises(LayercapError, match=r"line 2 has 1 field\(s\) for 2 columns \(no 'cost'\)"):
        lio.read_csv(c, required=("name", "cost"))
    c.write_text("nom,cost\na,1\n")
    with pytest.raises(LayercapError, match="header lacks 'name'"):
        lio.read_csv(c, required=("name", "cost"))
    y = tmp_path / "a.yaml"
    y.write_text("a: [1, 2\n")
    with pytest.raises(LayercapError, match="not valid YAML at line"):
        lio.read_yaml(y)
    y.write_text("a: 1\n")
    assert lio.read_yaml(y) == {"a": 1}
    y.write_bytes(b"a: \xff\n")
    with pytest.raises(LayercapError, match="not UTF-8"):
        lio.read_yaml(y)


@pytest.mark.parametrize("value,kw,expect", [
    ("3", {"integer": True}, 3), (3.0, {"integer": True}, 3), ("2.5", {}, 2.5), (10**400, {}, "not finite"),
    ("1e400", {"integer": True}, "not finite"), (float("nan"), {}, "not finite"), ("abc", {}, "not a number"),
    (True, {}, "not a number"), (2.5, {"integer": True}, "whole number"), (0, {"minimum": 0, "exclusive_minimum": True}, "> 0"),
    (-1, {"minimum": 0}, ">= 0"), (5, {"maximum": 4}, "<= 4"), (None, {}, "not a number"),
])
def test_check_number(value, kw, expect):
    if isinstance(expect, str):
        with pytest.raises(LayercapError, match=expect) as exc:
            lio.check_number(value, "params", "f.csv: row 1", **kw)
        assert str(exc.value).startswith("f.csv: row 1: params = ")
    else:
        got = lio.check_number(value, "params", **kw)
        assert got == expect and type(got) is type(expect)


def test_output_file_rules(tmp_path):
    src = tmp_path / "in.json"
    src.write_text("{}")
    with pytest.raises(LayercapError, match="also an input"):
        lio.check_output_file(src, "-o", [src])
    with pytest.raises(LayercapError, match="also an input"):  # same file by another path
        lio.check_output_file(tmp_path / "." / "in.json", "-o", [str(src)])
    with pytest.raises(LayercapError, match="is a folder"):
        lio.check_output_file(tmp_path)
    with pytest.raises(LayercapError, match="is a file, not a folder"):
        lio.check_output_file(src / "out.json")
    assert lio.check_output_file(tmp_path / "new" / "out.json", "-o", [src]) == tmp_path / "new" / "out.json"


def test_output_dir_rules(tmp_path):
    d = tmp_path / "d"
    lio.check_output_dir(d)  # new: fine
    d.mkdir()
    lio.check_output_dir(d)  # empty: fine
    (d / "mine.txt").write_text("x")
    with pytest.raises(LayercapError, match="did not write and it is not empty"):
        lio.check_output_dir(d)
    (d / "mine.txt").unlink()
    (d / "config.json").write_text("{}")
    lio.write_output_marker(d, "prune")
    assert json.loads((d / lio.OUTPUT_MARKER).read_text())["files"] == ["config.json"]
    lio.check_output_dir(d)  # layercap wrote it: may be replaced
    (d / "notes.txt").write_text("x")
    with pytest.raises(LayercapError, match="notes.txt"):
        lio.check_output_dir(d)
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(LayercapError, match="contains an input"):
        lio.check_output_dir(tmp_path, "-o", [model])
    with pytest.raises(LayercapError, match="is a file"):
        lio.check_output_dir(d / "notes.txt")


def test_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.csv"
    old = tmp_path / "old.json"
    old.write_text("keep")
    with pytest.raises(RuntimeError):
        with lio.all_or_nothing(a, b, old):
            lio.atomic_write_text(a, "1")
            lio.atomic_write_text(old, "2")
            raise RuntimeError("csv failed")
    assert not a.exists() and old.exists()  # new outputs removed; a file that existed stays
