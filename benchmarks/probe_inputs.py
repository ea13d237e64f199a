"""Hostile-input probe of every ``layercap`` sub-command (issue 15, part 2).

Runs several hundred hostile cases, each as its own ``python -m layercap`` process on tiny
random-init models, and classifies every outcome automatically:

    CLEAN          refused (exit != 0) with one message and no traceback, as expected
    OK             accepted (exit 0), as expected
    TRACEBACK      'Traceback' in stderr
    SILENT_ACCEPT  exit 0 where the case declares that the command must refuse
    LOST_FILE      a file that existed before (an input, a foreign file in the output folder)
                   changed or vanished
    LEFTOVER       a refused command left new files behind
    INTERNAL       refused, but by the CLI's safety net (an unexpected exception, not a
                   LayercapError naming file, field and fix)
    BAD_MESSAGE    refused cleanly, but the message does not match what the case expects (or
                   echoes binary bytes)
    FALSE_REFUSAL  refused where the case declares the input good
    TIMEOUT        ran past --timeout seconds

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/probe_inputs.py --jobs 2

writes ``benchmarks/results/probe_inputs.json`` (per case: command, expectation, outcome, exit
code, first stderr line, seconds) and prints a table by class and sub-command. ``--only SUBSTR``
runs the cases whose id contains SUBSTR. ``--fork`` runs each case in a child forked from one
process that imported torch once (faster; the default starts a fresh interpreter per case, as a
user would). The inputs are the ones of ``tests/test_bad_input.py`` (its ``_write_inputs`` and
its case list are reused) plus the probe's own, built into a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from test_bad_input import CASES as MATRIX, LAYERS, TEXT, _scores_doc, _write_inputs  # noqa: E402

REFUSE, ACCEPT, ANY = "refuse", "accept", "any"
ORDER = ["TRACEBACK", "LOST_FILE", "SILENT_ACCEPT", "LEFTOVER", "TIMEOUT", "INTERNAL", "BAD_MESSAGE", "FALSE_REFUSAL",
         "CLEAN", "OK"]
FAILURES = ORDER[:8]
TINY = "tiny-llama"


# ----------------------------------------------------------------------------------------------
# inputs


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def _alloc_doc(**layer):
    doc = {"schema": "layercap.allocation/v1", "rule": "manual", "budget": 4.0, "unit": "experts", "integer": True,
           "layers": [{"name": n, "n": 1, "cost": 1.0} for n in LAYERS], "mu": None, "binds": True, "spent": 4.0,
           "metadata": {}}
    for entry in doc["layers"]:
        entry.update(layer)
    return doc


def write_probe_inputs(d: Path) -> None:
    """The probe's inputs beyond the test matrix's (generic bad files, schema variants)."""
    # generic bad files of every kind
    (d / "empty.json").write_bytes(b"")
    (d / "empty.txt").write_bytes(b"")
    (d / "empty.csv").write_bytes(b"")
    (d / "empty.yaml").write_bytes(b"")
    (d / "blank.txt").write_text("\n\n   \n")
    (d / "trunc.json").write_text('{"schema": "layercap.scores/v1", "layers": [{"name": "model.la')
    (d / "array.json").write_text("[1, 2, 3]")
    (d / "null.json").write_text("null")
    (d / "string.json").write_text('"hello"')
    (d / "deep.json").write_text("[" * 100000)
    (d / "nan.json").write_text("NaN")
    (d / "utf16.json").write_bytes(json.dumps(_scores_doc()).encode("utf-16"))
    (d / "utf16.txt").write_bytes(TEXT.encode("utf-16"))
    (d / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(_scores_doc()).encode())
    (d / "bom.txt").write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    (d / "short.txt").write_text("Too short.")
    (d / "png.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 40)
    (d / "crlf.txt").write_bytes(TEXT.replace(". ", ".\r\n").encode())
    (d / "text.json").write_text(json.dumps([{"text": TEXT}, {"text": TEXT[::-1]}]))
    (d / "text.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i::3]}) for i in range(3)) + "\n")
    (d / "numbers.json").write_text(json.dumps([1, 2, 3]))
    (d / "badline.jsonl").write_text(json.dumps({"text": TEXT}) + "\n{not json\n")
    # scores files (JSON): every schema fault
    s = d / "scores"
    s.mkdir()
    base = _scores_doc()
    variants = {
        "schema_v2": {**base, "schema": "layercap.scores/v2"},
        "schema_int": {**base, "schema": 1},
        "no_layers": {"schema": base["schema"]},
        "layers_obj": {**base, "layers": {"a": 1}},
        "layers_empty": {**base, "layers": []},
        "layer_str": {**base, "layers": ["model.layers.0"]},
        "method_int": {**base, "method": 5},
        "metadata_list": {**base, "metadata": [1]},
        "dup_names": {**base, "layers": base["layers"][:2] + [dict(base["layers"][0])]},
    }
    for key in ("name", "zeta2", "params"):
        variants[f"no_{key}"] = {**base, "layers": [{k: v for k, v in l.items() if k != key} for l in base["layers"]]}
    bad_values = {
        "zeta2_str": ("zeta2", "big"), "zeta2_neg": ("zeta2", -1.0), "zeta2_bool": ("zeta2", True),
        "zeta2_null": ("zeta2", None), "zeta2_list": ("zeta2", [1]), "zeta2_zero": ("zeta2", 0.0),
        "params_float": ("params", 10.5), "params_zero": ("params", 0), "params_neg": ("params", -5),
        "params_str": ("params", "1000"), "params_bool": ("params", True),
        "cost_zero": ("cost", 0), "cost_neg": ("cost", -1.0), "cost_bool": ("cost", False), "cost_null": ("cost", None),
        "name_empty": ("name", ""), "name_int": ("name", 7), "extra_field": ("color", "red"),
    }
    for vid, (key, value) in bad_values.items():
        layers = [dict(l) for l in base["layers"]]
        for l in layers:
            l[key] = value
        if key == "name":
            layers = layers[:1]
        variants[vid] = {**base, "layers": layers}
    partial = [dict(l) for l in base["layers"]]
    partial[0]["cost"] = 2.0
    variants["cost_partial"] = {**base, "layers": partial}
    other = [dict(l, name=f"other.{i}") for i, l in enumerate(base["layers"])]
    variants["other_names"] = {**base, "layers": other}
    variants["three_layers"] = {**base, "layers": base["layers"][:3]}
    for vid, doc in variants.items():
        _dump(s / f"{vid}.json", doc)
    text = json.dumps(base)
    (s / "zeta2_nan.json").write_text(text.replace('"zeta2": 1.0', '"zeta2": NaN'))
    (s / "zeta2_inf.json").write_text(text.replace('"zeta2": 1.0', '"zeta2": Infinity'))
    (s / "zeta2_1e400.json").write_text(text.replace('"zeta2": 1.0', '"zeta2": 1e400'))
    (s / "params_1e400.json").write_text(text.replace('"params": 1000}', '"params": 1e400}'))
    # good ones
    _dump(s / "huge_equal.json", _scores_doc(zeta2=1e308))
    _dump(s / "single.json", {**base, "layers": base["layers"][:1]})
    _dump(s / "with_cost.json", _scores_doc(cost=2.0))
    tiny = [dict(l) for l in base["layers"]]
    tiny[0]["zeta2"] = 5e-324
    _dump(s / "subnormal.json", {**base, "layers": tiny})
    # scores files (CSV)
    c = d / "csv"
    c.mkdir()
    rows = "".join(f"{n},{1.0 + i},{1000 * (i + 1)}\n" for i, n in enumerate(LAYERS))
    csvs = {
        "header_only": "name,zeta2,params\n", "no_params": "name,zeta2\n" + "".join(f"{n},1\n" for n in LAYERS),
        "long_row": "name,zeta2,params\n" + rows + "x,1,2,3\n", "zeta2_nan": "name,zeta2,params\na,nan,10\nb,1,10\n",
        "zeta2_inf": "name,zeta2,params\na,inf,10\nb,1,10\n", "zeta2_neg": "name,zeta2,params\na,-1,10\nb,1,10\n",
        "zeta2_abc": "name,zeta2,params\na,abc,10\nb,1,10\n", "params_float": "name,zeta2,params\na,1,1.5\nb,1,10\n",
        "params_zero": "name,zeta2,params\na,1,0\nb,1,10\n", "dup_names": "name,zeta2,params\na,1,10\na,2,10\n",
        "semicolon": "name;zeta2;params\na;1;10\nb;2;20\n", "extra_column": "name,zeta2,params,color\na,1,10,red\nb,2,20,blue\n",
        "cost_partial": "name,zeta2,params,cost\na,1,10,2\nb,2,20,\n", "all_zero": "name,zeta2,params\na,0,10\nb,0,10\n",
        "empty_name": "name,zeta2,params\n,1,10\nb,2,20\n", "nul": "name,zeta2,params\na,1,10\x00\n",
        "dup_header": "name,zeta2,params,zeta2\na,1,10,2\n",
        # good ones
        "ok": "name,zeta2,params\n" + rows, "crlf": ("name,zeta2,params\n" + rows).replace("\n", "\r\n"),
        "quoted": 'name,zeta2,params\n"a,b",1,10\n"c",2,20\n', "blank_lines": "\nname,zeta2,params\n\n" + rows + "\n\n",
        "params_1e3": "name,zeta2,params\na,1,1e3\nb,2,20\n", "with_cost": "name,zeta2,params,cost\na,1,10,2\nb,2,20,1\n",
    }
    for vid, body in csvs.items():
        (c / f"{vid}.csv").write_text(body)
    (c / "bom.csv").write_bytes(b"\xef\xbb\xbf" + ("name,zeta2,params\n" + rows).encode())
    # cost files for allocate --cost
    k = d / "cost"
    k.mkdir()
    _dump(k / "ok.json", {n: 1.0 + i for i, n in enumerate(LAYERS)})
    (k / "ok.csv").write_text("name,cost\n" + "".join(f"{n},{1 + i}\n" for i, n in enumerate(LAYERS)))
    _dump(k / "missing_layer.json", {n: 1.0 for n in LAYERS[:3]})
    _dump(k / "zero.json", {n: 0.0 for n in LAYERS})
    _dump(k / "negative.json", {n: -1.0 for n in LAYERS})
    _dump(k / "string.json", {n: "one" for n in LAYERS})
    _dump(k / "list.json", [1, 1, 1, 1])
    (k / "nan.json").write_text("{" + ", ".join(f'"{n}": NaN' for n in LAYERS) + "}")
    (k / "huge.json").write_text("{" + ", ".join(f'"{n}": 1e400' for n in LAYERS) + "}")
    (k / "no_header.csv").write_text("".join(f"{n},1\n" for n in LAYERS))
    (k / "short.csv").write_text("name,cost\n" + "".join(f"{n}\n" for n in LAYERS))
    # ratios files for prune
    r = d / "ratios"
    r.mkdir()
    plain = {f"{n}": 0.5 for n in LAYERS}
    _dump(r / "plain.json", plain)
    _dump(r / "over_one.json", {n: 1.5 for n in LAYERS})
    _dump(r / "one.json", {n: 1.0 for n in LAYERS})
    _dump(r / "negative.json", {n: -0.1 for n in LAYERS})
    _dump(r / "string.json", {n: "half" for n in LAYERS})
    _dump(r / "unknown_block.json", {**plain, "model.layers.99": 0.5})
    _dump(r / "other_model.json", {f"encoder.{i}": 0.5 for i in range(4)})
    _dump(r / "empty_obj.json", {})
    _dump(r / "bool.json", {n: True for n in LAYERS})
    (r / "nan.json").write_text("{" + ", ".join(f'"{n}": NaN' for n in LAYERS) + "}")
    _dump(r / "schema_v9.json", {"schema": "layercap.ratios/v9", "layers": []})
    # allocations for finetune / export
    a = d / "alloc"
    a.mkdir()
    _dump(a / "ok.json", _alloc_doc())
    _dump(a / "zero.json", _alloc_doc(n=0))
    _dump(a / "negative.json", _alloc_doc(n=-2))
    _dump(a / "float.json", _alloc_doc(n=1.5))
    _dump(a / "string.json", _alloc_doc(n="two"))
    _dump(a / "schema_v2.json", {**_alloc_doc(), "schema": "layercap.allocation/v2"})
    _dump(a / "no_schema.json", {k: v for k, v in _alloc_doc().items() if k != "schema"})
    _dump(a / "continuous.json", {**_alloc_doc(n=1.25), "integer": False})
    other = _alloc_doc()
    for i, entry in enumerate(other["layers"]):
        entry["name"] = f"encoder.{i}"
    _dump(a / "other_names.json", other)
    _dump(a / "no_layers.json", {k: v for k, v in _alloc_doc().items() if k != "layers"})
    _dump(a / "scores_as_alloc.json", _scores_doc())
    (a / "nan.json").write_text(json.dumps(_alloc_doc()).replace('"n": 1', '"n": NaN'))
    # task files
    t = d / "tasks"
    t.mkdir()
    item = {"context": "Question?", "choices": [" yes", " no"], "label": 0}
    tasks = {
        "empty_list.json": "[]", "label_5.jsonl": json.dumps({**item, "label": 5}) + "\n",
        "label_neg.jsonl": json.dumps({**item, "label": -1}) + "\n", "label_str.jsonl": json.dumps({**item, "label": "a"}) + "\n",
        "one_choice.jsonl": json.dumps({**item, "choices": [" yes"]}) + "\n",
        "no_choices.jsonl": json.dumps({**item, "choices": []}) + "\n",
        "no_context.jsonl": json.dumps({"choices": [" a", " b"], "label": 0}) + "\n",
        "context_int.jsonl": json.dumps({**item, "context": 5}) + "\n",
        "choice_int.jsonl": json.dumps({**item, "choices": [1, 2]}) + "\n",
        "list_of_str.json": json.dumps(["a", "b"]), "bad.tsv": "just one column\nanother\n",
        "array_line.jsonl": "[1, 2]\n", "mixed.jsonl": json.dumps(item) + "\n" + json.dumps({"question": "Q", "choices": {"label": ["A"], "text": ["x"]}, "answerKey": "A"}) + "\n",
        "answer_missing.json": json.dumps([{"instruction": "Q? Answer1: a Answer2: b\n\nAnswer format: answer1/answer2", "input": "", "output": "x"}]),
        "b_key_unknown.jsonl": json.dumps({"question": "Q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "Z"}) + "\n",
        "ok.jsonl": "\n".join(json.dumps({**item, "label": i % 2}) for i in range(6)) + "\n",
    }
    for name, body in tasks.items():
        (t / name).write_text(body)
    (t / "nodir").mkdir()
    (t / "nodir" / "readme.md").write_text("no task here")
    # damage partial (a resumed `layercap damage`)
    # run configs
    y = d / "yaml"
    y.mkdir()
    configs = {
        "list": "- a\n- b\n", "unknown_section": "modle:\n  spec: tiny-llama\n", "unknown_key": "model:\n  spek: tiny-llama\n",
        "nsamples_str": "data:\n  nsamples: many\n", "nsamples_neg": "data:\n  nsamples: -4\n", "nsamples_float": "data:\n  nsamples: 2.5\n",
        "seqlen_huge": "model:\n  spec: tiny-llama\ndata:\n  seqlen: 100000\n", "sparsity_big": "pruning:\n  sparsity: 1.5\n",
        "sparsity_nan": "pruning:\n  sparsity: .nan\n", "budget_neg": "allocation:\n  budget: -1\n", "budget_inf": "allocation:\n  budget: .inf\n",
        "method_unknown": "scoring:\n  methods: [nope]\n", "rule_unknown": "allocation:\n  rules: [nope]\n",
        "prune_rule_unknown": "pruning:\n  rules: [nope]\n", "apply_not_in_rules": "pruning:\n  rules: [uniform]\n  apply: [owl]\n",
        "model_unknown": "model:\n  spec: tiny-nothing\n", "device_tpu": "model:\n  spec: tiny-llama\n  device: tpu\n",
        "structure_bad": "pruning:\n  structure: '3:7'\n", "section_scalar": "model: 5\n", "methods_str": "scoring:\n  methods: 5\n",
        "limit_zero": "evaluation:\n  limit: 0\n", "schema_v2": "schema: layercap.pipeline-config/v2\n",
        "duplicate_key": "model:\n  spec: tiny-llama\n  spec: tiny-gpt2\n", "tab_indent": "model:\n\tspec: tiny-llama\n",
        "anchors_bomb": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
        "ok_tiny": "model:\n  spec: tiny-llama\n",
    }
    for vid, body in configs.items():
        (y / f"{vid}.yaml").write_text(body)
    (y / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + b"model:\n  spec: tiny-llama\n")
    (y / "python_tag.yaml").write_text("model: !!python/object/apply:os.system ['true']\n")


def write_models(root: Path) -> None:
    """Tiny model folders (save_pretrained) and broken copies of them."""
    from layercap.models.tiny import build_tiny

    for family in ("llama", "gpt2"):
        model, tok = build_tiny(family)
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
    good = root / "llama"
    weights = good / "model.safetensors"

    def copy(name):
        shutil.copytree(good, root / name)
        return root / name

    data = weights.read_bytes()
    (copy("trunc_weights") / "model.safetensors").write_bytes(data[: len(data) // 2])
    (copy("zero_weights") / "model.safetensors").write_bytes(b"")
    (copy("garbage_weights") / "model.safetensors").write_bytes(b"\x00" * 1000)
    (copy("no_config") / "config.json").unlink()
    (copy("bin_config") / "config.json").write_bytes(b"\x00\xff" * 20)
    (copy("empty_config") / "config.json").write_bytes(b"")
    (copy("array_config") / "config.json").write_text("[]")
    (copy("unknown_type") / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()), "model_type": "nonsense"}))
    cfg = json.loads((good / "config.json").read_text())
    (copy("wrong_shape") / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    (copy("no_weights") / "model.safetensors").unlink()
    no_tok = copy("no_tokenizer")
    for f in no_tok.iterdir():
        if "token" in f.name or f.name.startswith("special"):
            f.unlink()
    (copy("bin_tokenizer") / "tokenizer.json").write_bytes(b"\x00\xff" * 30)
    idx = copy("index_missing_shard")
    (idx / "model.safetensors").rename(idx / "model-00001-of-00002.safetensors")
    (idx / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    (root / "empty_dir").mkdir()
    (root / "fake.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    (root / "text.gguf").write_text("not a model")


# ----------------------------------------------------------------------------------------------
# cases


def C(cid, argv, expect=REFUSE, pattern=None, prep=None, sub=None):
    return {"id": cid, "argv": argv, "expect": expect, "pattern": pattern, "prep": prep or [], "sub": sub or argv[0]}


I, O, M, K = "{in}", "{out}", "{models}", "{case}"
S = f"{I}/scores.json"
T = f"{I}/text.txt"
OK_ALLOC = f"{I}/alloc/ok.json"
TASK = f"{I}/tasks/ok.jsonl"
GENERIC = {  # a bad file of any kind
    "missing": f"{I}/nope.json", "folder": f"{I}/folder", "devnull": "/dev/null", "empty": f"{I}/empty.json",
    "binary": f"{I}/bin.json", "latin1": f"{I}/latin1.json", "utf16": f"{I}/utf16.json", "truncated": f"{I}/trunc.json",
    "array": f"{I}/array.json", "null": f"{I}/null.json", "string": f"{I}/string.json", "deep": f"{I}/deep.json",
    "nan": f"{I}/nan.json",
}
BAD_TEXT = {  # bad calibration / perplexity text
    "missing": f"{I}/nope.txt", "folder-empty": f"{I}/folder", "devnull": "/dev/null", "empty": f"{I}/empty.txt",
    "blank": f"{I}/blank.txt", "binary": f"{I}/bin.txt", "png": f"{I}/png.txt", "latin1": f"{I}/latin1.txt",
    "utf16": f"{I}/utf16.txt", "dir-with-binary": f"{I}/calib", "json-numbers": f"{I}/numbers.json",
    "jsonl-bad-line": f"{I}/badline.jsonl", "too-short": f"{I}/short.txt",
}
GOOD_TEXT = {"bom": f"{I}/bom.txt", "crlf": f"{I}/crlf.txt", "json": f"{I}/text.json", "jsonl": f"{I}/text.jsonl"}
MODELS_BAD = ["trunc_weights", "zero_weights", "garbage_weights", "no_config", "bin_config", "empty_config", "array_config",
              "unknown_type", "wrong_shape", "no_weights", "no_tokenizer", "empty_dir", "fake.gguf", "text.gguf", "bin_tokenizer",
              "index_missing_shard"]
DEVICES_BAD = ["tpu", "cuda:7", "cpu:1", "", "CPU", "mps"]


def _out_cases(sub, base, kind):
    """Output-path faults for a command whose -o is a ``kind`` ('file' or 'dir'); ``base`` lacks -o."""
    out = [
        C(f"{sub}-out-proc-readonly", [*base, "-o", f"/proc/layercap-probe/{'x.json' if kind == 'file' else 'x'}"]),
        C(f"{sub}-out-parent-is-file", [*base, "-o", f"{O}/keep.txt/{'x.json' if kind == 'file' else 'x'}"]),
        C(f"{sub}-out-dotdot", [*base, "-o", ".."]),
    ]
    if kind == "file":
        out += [C(f"{sub}-out-foreign-file", [*base, "-o", f"{O}/keep.txt"]),
                C(f"{sub}-out-folder", [*base, "-o", O])]
    else:
        out += [C(f"{sub}-out-foreign-folder", [*base, "-o", O]), C(f"{sub}-out-is-file", [*base, "-o", f"{O}/keep.txt"]),
                C(f"{sub}-out-dot", [*base, "-o", "."])]
    return out


def _scores_slot(sub, make):
    """Every bad scores file in one slot; ``make(path)`` gives the argv."""
    out = [C(f"{sub}-{vid}", make(path)) for vid, path in GENERIC.items()]
    for p in sorted((WORK / "in" / "scores").glob("*.json")):
        good = p.stem in ("huge_equal", "single", "with_cost", "subnormal")
        if p.stem in ("other_names", "three_layers"):
            continue
        expect = ACCEPT if good else ANY if p.stem == "cost_null" else REFUSE  # null cost everywhere = no cost column
        out.append(C(f"{sub}-json-{p.stem}", make(f"{I}/scores/{p.name}"), expect))
    for p in sorted((WORK / "in" / "csv").glob("*.csv")):
        good = p.stem in ("ok", "crlf", "quoted", "blank_lines", "params_1e3", "with_cost", "bom")
        out.append(C(f"{sub}-csv-{p.stem}", make(f"{I}/csv/{p.name}"), ACCEPT if good else REFUSE))
    return out


def cases() -> list[dict]:
    cs: list[dict] = []
    # 1. the bad-input matrix of tests/test_bad_input.py, as subprocesses
    for cid, argv, pattern in MATRIX:
        prep = [("mkdir", f"{O}/sub.csv")] if "--csv" in argv and argv[0] in ("allocate", "prune-ratios") else []
        if f"{O}/link" in argv:  # as test_bad_input does
            prep.append(("symlink", f"{I}/folder", f"{O}/link"))
        cs.append(C(f"matrix:{cid}", argv, REFUSE, pattern, prep))

    # 2. allocate
    al = lambda *extra: ["allocate", S, "--budget", "8", *extra, "-o", f"{O}/a.json"]
    cs += _scores_slot("allocate", lambda p: ["allocate", p, "--budget", "8", "-o", f"{O}/a.json"])
    for flag, values in {"--budget": ["inf", "-inf", "-8", "0", "1e400", "3"], "--beta": ["nan", "inf", "-1"],
                         "--alpha": ["nan", "-1", "0", "abc", "inf"], "--min": ["nan", "-1", "5", "inf"],
                         "--max": ["0", "-1", "nan", "0.5"]}.items():
        for v in values:
            cs.append(C(f"allocate{flag}={v}", al(flag, v)))
    cs += [C("allocate-min-above-max", al("--min", "3", "--max", "2")),
           C("allocate-budget-1e15", ["allocate", S, "--budget", "1e15", "-o", f"{O}/a.json"], ANY),
           C("allocate-budget40-max2", ["allocate", S, "--budget", "40", "--max", "2", "-o", f"{O}/a.json"], ACCEPT),
           C("allocate-ok", al(), ACCEPT), C("allocate-ok-csv", al("--csv"), ACCEPT),
           C("allocate-continuous-rank", al("--continuous", "--unit", "rank"), ACCEPT),
           C("allocate-rerun-own-output", al(), ACCEPT, prep=[("run", al())]),
           C("allocate-beta-ignored-by-uniform", al("--rule", "uniform", "--beta", "0.5")),
           C("allocate-alpha-ignored-by-uniform", al("--rule", "uniform", "--alpha", "2")),
           C("allocate-csv-output-name", ["allocate", S, "--budget", "8", "--csv", "-o", f"{O}/a.csv"]),
           C("allocate-rule-unknown", al("--rule", "nope")), C("allocate-no-budget", ["allocate", S, "-o", f"{O}/a.json"]),
           C("allocate-cost-is-scores", al("--cost", S))]
    cs.append(C("allocate-cost-list.json", al("--cost", f"{I}/cost/list.json"), ACCEPT))  # K costs in layer order: documented
    for vid in ("missing_layer.json", "zero.json", "negative.json", "string.json", "nan.json", "huge.json",
                "no_header.csv", "short.csv"):
        cs.append(C(f"allocate-cost-{vid}", al("--cost", f"{I}/cost/{vid}")))
    for vid, path in GENERIC.items():
        cs.append(C(f"allocate-cost-generic-{vid}", al("--cost", path)))
    big = lambda *extra: ["allocate", S, "--budget", "20000", *extra, "-o", f"{O}/a.json"]
    cs += [C("allocate-cost-ok-json", big("--cost", f"{I}/cost/ok.json"), ACCEPT),
           C("allocate-cost-ok-csv", big("--cost", f"{I}/cost/ok.csv"), ACCEPT),
           C("allocate-cost-params", big("--cost", "params"), ACCEPT)]
    cs += _out_cases("allocate", ["allocate", S, "--budget", "8"], "file")

    # 3. prune-ratios
    pr = lambda *extra: ["prune-ratios", S, "--sparsity", "0.5", *extra, "-o", f"{O}/r.json"]
    cs += _scores_slot("ratios", lambda p: ["prune-ratios", p, "--sparsity", "0.5", "-o", f"{O}/r.json"])
    for flag, values in {"--sparsity": ["inf", "-0.1", "1", "1.5"], "--eta": ["nan", "inf", "-1"],
                         "--p": ["1", "0.5", "nan", "inf"], "--min-ratio": ["-0.1", "1", "nan"],
                         "--max-ratio": ["0", "1.1", "nan"]}.items():
        for v in values:
            cs.append(C(f"ratios{flag}={v}", ["prune-ratios", S, *(["--sparsity", "0.5"] if flag != "--sparsity" else []),
                                                 flag, v, "-o", f"{O}/r.json"]))
    for flag, values in {"--gamma": ["nan", "-1"], "--bits": ["0", "-1", "nan"]}.items():
        for v in values:
            cs.append(C(f"ratios-at-least{flag}={v}", pr("--mode", "at-least", flag, v)))
    cs += [C("ratios-min-above-max", pr("--min-ratio", "0.6", "--max-ratio", "0.4")),
           C("ratios-sparsity-above-max-ratio", ["prune-ratios", S, "--sparsity", "0.97", "-o", f"{O}/r.json"]),
           C("ratios-gamma-ignored-in-exact", pr("--gamma", "2")), C("ratios-bits-ignored-in-exact", pr("--bits", "8")),
           C("ratios-eta-ignored-by-uniform", pr("--rule", "uniform", "--eta", "2")),
           C("ratios-ok", pr(), ACCEPT), C("ratios-ok-at-least", pr("--mode", "at-least", "--gamma", "2"), ACCEPT),
           C("ratios-ok-csv", pr("--csv"), ACCEPT), C("ratios-rerun-own-output", pr(), ACCEPT, prep=[("run", pr())]),
           C("ratios-sparsity-0", ["prune-ratios", S, "--sparsity", "0", "-o", f"{O}/r.json"], ANY)]
    cs += _out_cases("ratios", ["prune-ratios", S, "--sparsity", "0.5"], "file")

    # 4. transfer
    tr = lambda *extra: ["transfer", S, f"{I}/scores/with_cost.json", *extra]
    for vid, path in GENERIC.items():
        cs.append(C(f"transfer-source-{vid}", ["transfer", path, S, "--program", "allocation", "--budget", "8"]))
        cs.append(C(f"transfer-target-{vid}", ["transfer", S, path, "--program", "pruning", "--sparsity", "0.5"]))
    for vid in ("schema_v2", "zeta2_nan", "params_zero", "dup_names", "extra_field"):
        cs.append(C(f"transfer-target-{vid}", ["transfer", S, f"{I}/scores/{vid}.json", "--program", "allocation", "--budget", "8"]))
    cs += [C("transfer-other-layers", ["transfer", S, f"{I}/scores/other_names.json", "--program", "allocation", "--budget", "8"]),
           C("transfer-fewer-layers", ["transfer", S, f"{I}/scores/three_layers.json", "--program", "pruning", "--sparsity", "0.5"]),
           C("transfer-no-program", ["transfer", S, S]), C("transfer-allocation-no-budget", tr("--program", "allocation")),
           C("transfer-pruning-no-sparsity", tr("--program", "pruning")),
           C("transfer-eta-ignored-by-allocation", tr("--program", "allocation", "--budget", "8", "--eta", "2")),
           C("transfer-beta-ignored-by-pruning", tr("--program", "pruning", "--sparsity", "0.5", "--beta", "0.5")),
           C("transfer-mode-ignored-by-allocation", tr("--program", "allocation", "--budget", "8", "--mode", "at-least")),
           C("transfer-budget-nan", tr("--program", "allocation", "--budget", "nan")),
           C("transfer-sparsity-1", tr("--program", "pruning", "--sparsity", "1")),
           C("transfer-csv-without-o", tr("--program", "pruning", "--sparsity", "0.5", "--csv")),
           C("transfer-ok-allocation", tr("--program", "allocation", "--budget", "8"), ACCEPT),
           C("transfer-ok-pruning-o", tr("--program", "pruning", "--sparsity", "0.5", "-o", f"{O}/t.json", "--csv"), ACCEPT),
           C("transfer-output-is-target", ["transfer", S, f"{K}/t.json", "--program", "pruning", "--sparsity", "0.5", "-o", f"{K}/t.json"],
             prep=[("copy", f"{I}/scores/with_cost.json", f"{K}/t.json")])]
    cs += _out_cases("transfer", tr("--program", "allocation", "--budget", "8"), "file")

    # 5. export
    R = f"{I}/ratios.json"
    ex = lambda *extra, d=R: ["export", d, *extra]
    for vid, path in GENERIC.items():
        cs.append(C(f"export-decisions-{vid}", ["export", path, "--format", "csv", "-o", f"{O}/t.csv"]))
    for vid in ("zero", "negative", "string", "schema_v2", "no_schema", "no_layers", "scores_as_alloc", "nan", "other_names"):
        cs.append(C(f"export-alloc-{vid}", ["export", f"{I}/alloc/{vid}.json", "--format", "peft", "--model", TINY,
                                             "-o", f"{O}/peft"]))
    cs += [C("export-peft-continuous", ["export", f"{I}/alloc/continuous.json", "--format", "peft", "--model", TINY, "-o", f"{O}/peft"]),
           C("export-peft-ratios", ex("--format", "peft", "--model", TINY, "-o", f"{O}/peft")),
           C("export-peft-no-model", ["export", OK_ALLOC, "--format", "peft", "-o", f"{O}/peft"]),
           C("export-llmc-alloc", ["export", OK_ALLOC, "--format", "llmcompressor", "-o", f"{O}/r.yaml"]),
           C("export-rank-unit-0", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "--rank-unit", "0", "-o", f"{O}/peft"]),
           C("export-alpha-ratio-nan", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "--alpha-ratio", "nan", "-o", f"{O}/peft"]),
           C("export-dropout-1.5", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "--dropout", "1.5", "-o", f"{O}/peft"]),
           C("export-dropout-neg", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "--dropout", "-0.1", "-o", f"{O}/peft"]),
           C("export-targets-comma", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "--targets", ",", "-o", f"{O}/peft"]),
           C("export-targets-unknown", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "--targets", "foo_proj", "-o", f"{O}/peft"]),
           C("export-peft-folder-with-other-files", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "-o", O], ACCEPT),
           C("export-peft-foreign-adapter-config", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "-o", f"{O}/a"],
             prep=[("write", f"{O}/a/adapter_config.json", '{"peft_type": "LORA", "r": 64}')]),
           C("export-peft-into-model-dir", ["export", OK_ALLOC, "--format", "peft", "--model", f"{K}/llama", "-o", f"{K}/llama/adapter"],
             prep=[("copytree", f"{M}/llama", f"{K}/llama")]),
           C("export-peft-method-ignored", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "--method", "wanda", "-o", f"{O}/peft"]),
           C("export-llmc-rank-unit-ignored", ex("--format", "llmcompressor", "--rank-unit", "4", "-o", f"{O}/r.yaml")),
           C("export-dampening-neg", ex("--format", "llmcompressor", "--dampening-frac", "-1", "-o", f"{O}/r.yaml")),
           C("export-dampening-nan", ex("--format", "llmcompressor", "--dampening-frac", "nan", "-o", f"{O}/r.yaml")),
           C("export-block-size-0", ex("--format", "llmcompressor", "--block-size", "0", "-o", f"{O}/r.yaml")),
           C("export-structure-2of4-mismatch", ex("--format", "llmcompressor", "--structure", "2:4", "-o", f"{O}/r.yaml"), ANY),
           C("export-table-bad-blocks", ex("--format", "csv", "--model", TINY, "--blocks", "(", "-o", f"{O}/t.csv")),
           C("export-table-bad-modules", ex("--format", "csv", "--model", TINY, "--modules", "[", "-o", f"{O}/t.csv")),
           C("export-table-blocks-match-nothing", ex("--format", "csv", "--model", TINY, "--blocks", "nothing", "-o", f"{O}/t.csv")),
           C("export-model-missing", ex("--format", "csv", "--model", f"{M}/nope", "-o", f"{O}/t.csv")),
           C("export-model-bin-config", ex("--format", "csv", "--model", f"{M}/bin_config", "-o", f"{O}/t.csv")),
           C("export-model-array-config", ex("--format", "csv", "--model", f"{M}/array_config", "-o", f"{O}/t.csv")),
           C("export-model-unknown-type", ex("--format", "csv", "--model", f"{M}/unknown_type", "-o", f"{O}/t.csv")),
           C("export-ratios-other-model", ["export", f"{I}/ratios/other_model.json", "--format", "csv", "--model", TINY, "-o", f"{O}/t.csv"]),
           C("export-overwrites-input", ex("--format", "json", "-o", f"{K}/r.json", d=f"{K}/r.json"), prep=[("copy", R, f"{K}/r.json")]),
           C("export-ok-llmc", ex("--format", "llmcompressor", "-o", f"{O}/r.yaml"), ACCEPT),
           C("export-ok-csv", ex("--format", "csv", "--model", TINY, "-o", f"{O}/t.csv"), ACCEPT),
           C("export-ok-json", ex("--format", "json", "-o", f"{O}/t.json"), ACCEPT),
           C("export-ok-peft", ["export", OK_ALLOC, "--format", "peft", "--model", f"{M}/llama", "-o", f"{O}/peft"], ACCEPT),
           C("export-peft-rerun-own", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "-o", f"{O}/peft"], ACCEPT,
             prep=[("run", ["export", OK_ALLOC, "--format", "peft", "--model", TINY, "-o", f"{O}/peft"])])]
    cs += _out_cases("export", ex("--format", "json"), "file")
    cs += _out_cases("export-peft", ["export", OK_ALLOC, "--format", "peft", "--model", TINY], "dir")[:2]

    # 6. score
    sc = lambda *extra, data=T, model=TINY: ["score", model, "--method", "gradnorm", "--data", data, "--nsamples", "2",
                                             "--seqlen", "16", "--quiet", *extra]
    so = lambda *extra, **kw: [*sc(*extra, **kw), "-o", f"{O}/s.json"]
    for vid, path in BAD_TEXT.items():
        cs.append(C(f"score-data-{vid}", so(data=path)))
    for vid, path in GOOD_TEXT.items():
        cs.append(C(f"score-data-{vid}", so(data=path), ACCEPT))
    for m in MODELS_BAD:
        cs.append(C(f"score-model-{m}", so(model=f"{M}/{m}")))
    cs += [C("score-model-unknown-name", so(model="tiny-nothing")), C("score-model-missing", so(model=f"{M}/nope"))]
    for flag, values in {"--nsamples": ["0", "-1"], "--seqlen": ["0", "1", "257", "100000"], "--batch-size": ["0"],
                         "--damping": ["0", "-1", "nan", "inf"], "--checkpoint-every": ["-1"], "--max-factor-gb": ["0", "nan"],
                         "--cg-tol": ["nan", "0"], "--cg-max-iter": ["0"]}.items():
        for v in values:
            cs.append(C(f"score{flag}={v}", so(flag, v)))
    for dev in DEVICES_BAD:
        cs.append(C(f"score-device-{dev or 'empty'}", so("--device", dev)))
    cs += [C("score-seqlen-over-text", so("--seqlen", "250", data=f"{I}/short.txt")),
           C("score-method-unknown", so("--method", "nope")),
           C("score-groups-not-object", so("--groups", f"{I}/array.json")),
           C("score-groups-empty", so("--groups", f"{I}/cost/ok.json")),
           C("score-groups-bad-regex", so("--groups", f"{I}/groups_bad.json"), prep=[("write", f"{I}/groups_bad.json", '{"a": "("}')]),
           C("score-groups-match-nothing", so("--groups", f"{K}/groups.json"), prep=[("write", f"{K}/groups.json", '{"a": "nothing_here"}')]),
           C("score-blocks-match-nothing", so("--blocks", "nothing_here")),
           C("score-modules-match-nothing", so("--modules", "nothing_here")),
           C("score-cg-tol-ignored-by-gradnorm", so("--cg-tol", "0.01")),
           C("score-fisher-ignored-by-gradnorm", so("--fisher", "true")),
           C("score-max-factor-ignored-by-diag", [*sc("--max-factor-gb", "1"), "-o", f"{O}/s.json"]),
           C("score-suffix-txt", [*sc(), "-o", f"{O}/s.txt"]),
           C("score-checkpoint-dir-is-file", so("--checkpoint-dir", f"{O}/keep.txt")),
           C("score-checkpoint-dir-is-input", so("--checkpoint-dir", f"{I}", "--checkpoint-every", "1")),
           C("score-corrupt-checkpoint-resume", so("--resume", "--checkpoint-every", "1", "--checkpoint-dir", f"{K}/ck"), ANY,
             prep=[("mkdir", f"{K}/ck"), ("write", f"{K}/ck/state.pt", "garbage")]),
           C("score-ok", so(), ACCEPT), C("score-ok-csv", so("--csv"), ACCEPT),
           C("score-ok-gpt2-full-context", so("--seqlen", "256", "--nsamples", "1", model="tiny-gpt2", data=f"{I}/text.txt"), ACCEPT),
           C("score-ok-folder-model", so(model=f"{M}/llama"), ACCEPT),
           C("score-output-is-data", [*sc(data=f"{K}/text.txt"), "-o", f"{K}/text.txt"], prep=[("copy", T, f"{K}/text.txt")]),
           C("score-output-in-model-dir", [*sc(model=f"{K}/llama"), "-o", f"{K}/llama/config.json"],
             prep=[("copytree", f"{M}/llama", f"{K}/llama")])]
    cs += _out_cases("score", sc(), "file")

    # 7. prune
    pm = lambda *extra, model=TINY: ["prune", model, "--method", "magnitude", "--quiet", *extra]
    pw = lambda *extra, data=T: ["prune", TINY, "--method", "wanda", "--data", data, "--nsamples", "2", "--seqlen", "16",
                                 "--quiet", *extra]
    po = lambda argv: [*argv, "-o", f"{O}/p"]
    for vid, path in GENERIC.items():
        cs.append(C(f"prune-ratios-file-{vid}", po(pm("--ratios", path))))
    for f in ("over_one", "one", "negative", "string", "unknown_block", "other_model", "empty_obj", "bool", "nan", "schema_v9"):
        cs.append(C(f"prune-ratios-{f}", po(pm("--ratios", f"{I}/ratios/{f}.json"))))
    for vid, path in list(BAD_TEXT.items())[:10]:
        cs.append(C(f"prune-data-{vid}", po(pw("--sparsity", "0.5", data=path))))
    for m in MODELS_BAD:
        cs.append(C(f"prune-model-{m}", po(pm("--sparsity", "0.5", model=f"{M}/{m}"))))
    for v in ("nan", "-0.1", "1", "1.5", "inf"):
        cs.append(C(f"prune-sparsity={v}", po(pm("--sparsity", v))))
    for flag, v in (("--nsamples", "0"), ("--seqlen", "0"), ("--seqlen", "257"), ("--batch-size", "0")):
        cs.append(C(f"prune{flag}={v}", po(pw("--sparsity", "0.5", flag, v))))
    for dev in DEVICES_BAD:
        cs.append(C(f"prune-device-{dev or 'empty'}", po(pm("--sparsity", "0.5", "--device", dev))))
    cs += [C("prune-2of4-wrong-ratio", po(pm("--sparsity", "0.3", "--structure", "2:4"))),
           C("prune-compressed-4of8", po(pm("--sparsity", "0.5", "--structure", "4:8", "--save-format", "compressed-tensors")), ANY),
           C("prune-blocks-match-nothing", po(pm("--sparsity", "0.5", "--blocks", "nothing_here"))),
           C("prune-modules-match-nothing", po(pm("--sparsity", "0.5", "--modules", "nothing_here"))),
           C("prune-data-ignored-by-magnitude", po(pm("--sparsity", "0.5", "--data", T))),
           C("prune-wanda-no-data", po(["prune", TINY, "--sparsity", "0.5", "--method", "wanda"])),
           C("prune-output-is-model-dir", [*pm("--sparsity", "0.5", model=f"{K}/llama"), "-o", f"{K}/llama"],
             prep=[("copytree", f"{M}/llama", f"{K}/llama")]),
           C("prune-output-inside-model-dir", [*pm("--sparsity", "0.5", model=f"{K}/llama"), "-o", f"{K}/llama/pruned"], ANY,
             prep=[("copytree", f"{M}/llama", f"{K}/llama")]),  # a new sub-folder: nothing of the model is touched
           C("prune-ok", po(pm("--sparsity", "0.5")), ACCEPT), C("prune-ok-ratios", po(pm("--ratios", f"{I}/ratios/plain.json")), ACCEPT),
           C("prune-ok-wanda", po(pw("--sparsity", "0.5")), ACCEPT),
           C("prune-ok-folder-model", po(pm("--sparsity", "0.5", model=f"{M}/llama")), ACCEPT),
           C("prune-ok-pruned-model", [*pm("--sparsity", "0.3", model=f"{K}/p1"), "-o", f"{O}/p"], ACCEPT,
             prep=[("run", [*pm("--sparsity", "0.5"), "-o", f"{K}/p1"])]),
           C("prune-ok-rerun-own", po(pm("--sparsity", "0.5")), ACCEPT, prep=[("run", po(pm("--sparsity", "0.5")))]),
           C("prune-ok-gpt2", po(["prune", "tiny-gpt2", "--sparsity", "0.5", "--method", "wanda", "--data", T, "--nsamples", "1",
                                  "--seqlen", "256", "--quiet"]), ACCEPT)]
    cs += _out_cases("prune", pm("--sparsity", "0.5"), "dir")

    # 8. damage
    dm = lambda *extra, data=T, model=TINY: ["damage", model, "--data", data, "--nsamples", "2", "--seqlen", "16",
                                             "--levels", "0.5", "--method", "magnitude", "--quiet", *extra]
    do = lambda *extra, **kw: [*dm(*extra, **kw), "-o", f"{O}/d.json"]
    for vid, path in list(BAD_TEXT.items())[:10]:
        cs.append(C(f"damage-data-{vid}", do(data=path)))
    for m in MODELS_BAD[:8]:
        cs.append(C(f"damage-model-{m}", do(model=f"{M}/{m}")))
    lv = lambda *levels: ["damage", TINY, "--data", T, "--nsamples", "2", "--seqlen", "16", "--method", "magnitude",
                          "--quiet", "--levels", *levels, "-o", f"{O}/d.json"]
    cs += [C(f"damage-levels-{'_'.join(v)}", lv(*v)) for v in (["nan"], ["-0.1"], ["1"], ["1.5"], ["0.5", "0.2"],
                                                                ["0.5", "0.5"], ["inf"])]
    for flag, v in (("--nsamples", "0"), ("--seqlen", "0"), ("--seqlen", "257"), ("--batch-size", "0")):
        cs.append(C(f"damage{flag}={v}", do(flag, v)))
    for dev in DEVICES_BAD[:4]:
        cs.append(C(f"damage-device-{dev or 'empty'}", do("--device", dev)))
    cs += [C("damage-fisher-ignored-without-obd", do("--fisher", "empirical")),
           C("damage-corrupt-partial", do(), ANY, prep=[("write", f"{O}/d.json.partial", '{"schema": "layercap.dam')]),
           C("damage-binary-partial", do(), ANY, prep=[("write", f"{O}/d.json.partial", "\x00\x01garbage")]),
           C("damage-partial-other-settings", do("--levels", "0.3"), ANY,
             prep=[("run", [*dm(), "-o", f"{O}/d2.json"]), ("copy", f"{O}/d2.json", f"{O}/d.json.partial")]),
           C("damage-output-is-data", [*dm(data=f"{K}/text.txt"), "-o", f"{K}/text.txt"], prep=[("copy", T, f"{K}/text.txt")]),
           C("damage-ok", do(), ACCEPT), C("damage-ok-obd", do("--obd", "diag"), ACCEPT)]
    cs += _out_cases("damage", dm(), "file")

    # 9. evaluate
    ev = lambda *extra, model=TINY: ["evaluate", model, "--seqlen", "32", "--quiet", *extra]
    eo = lambda *extra, **kw: [*ev(*extra, **kw), "-o", f"{O}/e.json"]
    for vid, path in BAD_TEXT.items():
        cs.append(C(f"evaluate-ppl-{vid}", eo("--ppl", path), ANY if vid == "too-short" else REFUSE))  # a short text has a perplexity
    for vid, path in GOOD_TEXT.items():
        cs.append(C(f"evaluate-ppl-{vid}", eo("--ppl", path), ACCEPT))
    for f in sorted((WORK / "in" / "tasks").iterdir()):
        cs.append(C(f"evaluate-task-{f.name}", eo("--tasks", f"{I}/tasks/{f.name}"), ACCEPT if f.name == "ok.jsonl" else REFUSE))
    for vid in ("binary", "latin1", "empty", "truncated", "null", "deep", "utf16"):
        cs.append(C(f"evaluate-task-generic-{vid}", eo("--tasks", GENERIC[vid])))
    for m in MODELS_BAD:
        cs.append(C(f"evaluate-model-{m}", eo("--ppl", T, model=f"{M}/{m}")))
    for flag, v in (("--seqlen", "0"), ("--seqlen", "257"), ("--stride", "0"), ("--stride", "64"), ("--limit", "-1"),
                    ("--max-tokens", "1"), ("--batch-size", "0")):
        cs.append(C(f"evaluate{flag}={v}", eo("--ppl", T, flag, v)))
    for dev in DEVICES_BAD[:4]:
        cs.append(C(f"evaluate-device-{dev or 'empty'}", eo("--ppl", T, "--device", dev)))
    for vid in ("missing", "folder", "binary", "array"):
        cs.append(C(f"evaluate-reference-{vid}", eo("--ppl", T, "--reference", GENERIC[vid])))
    cs += [C("evaluate-reference-scores-file", eo("--tasks", TASK, "--reference", S)),
           C("evaluate-nothing", eo()),
           C("evaluate-limit-ignored-without-tasks", eo("--ppl", T, "--limit", "3")),
           C("evaluate-stride-ignored-without-ppl", eo("--tasks", TASK, "--stride", "8")),
           C("evaluate-lm-eval-unknown-task", eo("--lm-eval", "nope_task")),
           C("evaluate-tasks-dir-without-tasks", eo("--tasks", f"{I}/tasks/nodir")),
           C("evaluate-output-is-task", [*ev("--tasks", f"{K}/t.jsonl"), "-o", f"{K}/t.jsonl"], prep=[("copy", TASK, f"{K}/t.jsonl")]),
           C("evaluate-ok-ppl", eo("--ppl", T), ACCEPT), C("evaluate-ok-tasks", eo("--tasks", TASK), ACCEPT),
           C("evaluate-ok-gpt2-full-context", eo("--ppl", T, "--seqlen", "256", model="tiny-gpt2"), ACCEPT),
           C("evaluate-ok-rerun-own", eo("--ppl", T), ACCEPT, prep=[("run", eo("--ppl", T))])]
    cs += _out_cases("evaluate", ev("--ppl", T), "file")

    # 10. finetune
    ft = lambda *extra, alloc=OK_ALLOC, train=TASK, model=TINY: [
        "finetune", model, "--allocation", alloc, "--train", train, "--max-steps", "1", "--batch-size", "2",
        "--max-length", "32", "--limit-train", "4", "--rank", "2", "--no-progress", *extra]
    fo = lambda *extra, **kw: [*ft(*extra, **kw), "-o", f"{O}/f"]
    for vid, path in GENERIC.items():
        cs.append(C(f"finetune-alloc-file-{vid}", fo(alloc=path)))
    for vid in ("zero", "negative", "float", "string", "schema_v2", "no_schema", "continuous", "other_names", "no_layers",
                "scores_as_alloc", "nan"):
        cs.append(C(f"finetune-alloc-{vid}", fo(alloc=f"{I}/alloc/{vid}.json")))
    for vid in ("missing", "binary", "latin1", "empty", "truncated", "null"):
        cs.append(C(f"finetune-train-{vid}", fo(train=GENERIC[vid])))
    for name in ("empty_list.json", "label_5.jsonl", "one_choice.jsonl", "no_context.jsonl", "context_int.jsonl"):
        cs.append(C(f"finetune-train-{name}", fo(train=f"{I}/tasks/{name}")))
    for vid in ("binary", "missing", "folder"):
        cs.append(C(f"finetune-eval-{vid}", fo("--eval", GENERIC[vid])))
    for m in MODELS_BAD[:8]:
        cs.append(C(f"finetune-model-{m}", fo(model=f"{M}/{m}")))
    for flag, v in (("--rank", "0"), ("--alpha", "nan"), ("--alpha", "-1"), ("--top-k", "0"), ("--aux-coef", "nan"),
                    ("--aux-coef", "-1"), ("--epochs", "0"), ("--epochs", "nan"), ("--max-steps", "-5"), ("--lr", "nan"),
                    ("--lr", "inf"), ("--lr", "-1"), ("--batch-size", "0"), ("--max-length", "0"), ("--max-length", "100000"),
                    ("--limit-train", "0"), ("--limit-eval", "0"), ("--eval-batch-size", "0"), ("--save-steps", "0"),
                    ("--save-steps", "-1"), ("--adapter", "bogus"), ("--targets", "foo_proj"), ("--targets", ",")):
        cs.append(C(f"finetune{flag}={v}", fo(flag, v)))
    cs += [C("finetune-top-k-ignored-by-lora", fo("--adapter", "lora", "--top-k", "3")),
           C("finetune-aux-coef-ignored-by-lora", fo("--adapter", "lora", "--aux-coef", "0.5")),
           C("finetune-limit-eval-without-eval", fo("--limit-eval", "3")),
           C("finetune-eval-format-without-eval", fo("--eval-format", "both")),
           C("finetune-output-is-model-dir", [*ft(model=f"{K}/llama"), "-o", f"{K}/llama"], prep=[("copytree", f"{M}/llama", f"{K}/llama")]),
           C("finetune-resume-changed-lr", fo("--resume", "--lr", "0.001"), ANY, prep=[("run", fo())]),
           C("finetune-rerun-without-resume", fo(), ANY, prep=[("run", fo())]),
           C("finetune-resume-empty-folder", fo("--resume"), ANY, prep=[("mkdir", f"{O}/f")]),
           C("finetune-resume-truncated-checkpoint", fo("--resume", "--save-steps", "1"), ACCEPT,
             prep=[("run", fo("--save-steps", "1")), ("truncate-last-checkpoint", f"{O}/f")]),
           C("finetune-ok", fo(), ACCEPT), C("finetune-ok-lora", fo("--adapter", "lora"), ACCEPT),
           C("finetune-ok-eval", fo("--eval", TASK, "--limit-eval", "2"), ACCEPT)]
    cs += _out_cases("finetune", ft(), "dir")

    # 11. compare-allocation
    ca = lambda *extra, train=TASK: ["compare-allocation", TINY, "--budget", "8", "--rules", "uniform", "--train", train,
                                     "--max-steps", "1", "--batch-size", "2", "--max-length", "32", "--limit-train", "4",
                                     "--rank", "2", "--calib-nsamples", "2", "--calib-seqlen", "16", "--no-progress", *extra]
    cao = lambda *extra, **kw: [*ca(*extra, **kw), "-o", f"{O}/c"]
    for flag, v in (("--budget", "nan"), ("--budget", "inf"), ("--budget", "-1"), ("--budget", "2"), ("--beta", "nan"),
                    ("--lower", "-1"), ("--calib-nsamples", "0"), ("--calib-seqlen", "0"), ("--calib-seqlen", "1000"),
                    ("--calib-batch-size", "0"), ("--lr", "nan"), ("--rank", "-1")):
        cs.append(C(f"cmp-alloc{flag}={v}", cao(flag, v)))
    cs += [C("cmp-alloc-rule-unknown", [*ca(), "--rules", "nope", "-o", f"{O}/c"]),
           C("cmp-alloc-rule-method-unknown", [*ca(), "--rules", "mdl:nope", "-o", f"{O}/c"]),
           C("cmp-alloc-seeds-duplicate", cao("--seeds", "0", "0")),
           C("cmp-alloc-eval-count-mismatch", cao("--eval", TASK, TASK)),
           C("cmp-alloc-train-binary", cao(train=f"{I}/bin.json")), C("cmp-alloc-train-missing", cao(train=f"{I}/nope.json")),
           C("cmp-alloc-train-latin1", cao(train=f"{I}/latin1.jsonl")),
           C("cmp-alloc-output-is-file", [*ca(), "-o", f"{O}/keep.txt"]),
           C("cmp-alloc-output-dot", [*ca(), "-o", "."]),
           C("cmp-alloc-resume-changed-budget", cao("--resume", "--budget", "12"), ANY, prep=[("run", cao())]),
           C("cmp-alloc-ok", cao(), ACCEPT)]
    cs += _out_cases("cmp-alloc", ca(), "dir")[:3]

    # 12. compare-pruning
    cp = lambda *extra, data=T: ["compare-pruning", TINY, "--data", data, "--ppl", f"{I}/other.txt", "--nsamples", "2",
                                 "--seqlen", "16", "--eval-seqlen", "32", "--rules", "uniform", "--methods", "magnitude",
                                 "--quiet", *extra]
    cpo = lambda *extra, **kw: [*cp(*extra, **kw), "-o", f"{O}/c"]
    for flag, v in (("--sparsity", "nan"), ("--sparsity", "-0.5"), ("--nsamples", "0"), ("--seqlen", "257"),
                    ("--eval-seqlen", "0"), ("--eval-seqlen", "300"), ("--start-token", "-1"), ("--start-token", "100000000"),
                    ("--limit", "0"), ("--min-ratio", "0.6"), ("--max-ratio", "1.5"), ("--batch-size", "0"),
                    ("--max-tokens", "1"), ("--search-generations", "0"), ("--damage-nsamples", "0")):
        cs.append(C(f"cmp-pruning{flag}={v}", cpo(flag, v)))
    for dev in DEVICES_BAD[:3]:
        cs.append(C(f"cmp-pruning-device-{dev or 'empty'}", cpo("--device", dev)))
    for vid in ("missing", "latin1", "utf16", "empty", "dir-with-binary"):
        cs.append(C(f"cmp-pruning-data-{vid}", cpo(data=BAD_TEXT[vid])))
    cs += [C("cmp-pruning-ppl-binary", [*cp(), "--ppl", f"{I}/bin.txt", "-o", f"{O}/c"]),
           C("cmp-pruning-tasks-bad", cpo("--tasks", f"{I}/tasks/label_5.jsonl")),
           C("cmp-pruning-rule-unknown", [*cp(), "--rules", "nope", "-o", f"{O}/c"]),
           C("cmp-pruning-damage-levels-bad", cpo("--rules", "mdl:damage", "--damage-levels", "0.5", "0.2")),
           C("cmp-pruning-damage-levels-ignored", cpo("--damage-levels", "0.2", "0.4")),
           C("cmp-pruning-generations-ignored", cpo("--search-generations", "3")),
           C("cmp-pruning-no-data", ["compare-pruning", TINY, "--rules", "uniform", "-o", f"{O}/c"]),
           C("cmp-pruning-report-only-missing", ["compare-pruning", TINY, "--report-only", "-o", f"{O}/none"]),
           C("cmp-pruning-report-only-foreign", ["compare-pruning", TINY, "--report-only", "-o", O]),
           C("cmp-pruning-report-only-corrupt", ["compare-pruning", TINY, "--report-only", "-o", f"{K}/c"],
             prep=[("run", [*cp(), "-o", f"{K}/c"]), ("write-glob", f"{K}/c/cells/*.json", "{trunc")]),
           C("cmp-pruning-rerun-corrupt-run-json", cpo(), ANY,
             prep=[("run", cpo()), ("write", f"{O}/c/run.json", "\x00garbage")]),
           C("cmp-pruning-output-is-data", [*cp(data=f"{K}/text.txt"), "-o", f"{K}/text.txt"], prep=[("copy", T, f"{K}/text.txt")]),
           C("cmp-pruning-ok", cpo(), ACCEPT)]
    cs += _out_cases("cmp-pruning", cp(), "dir")[:3]

    # 13. run (the main job); --print-config where the config alone is at fault
    for f in sorted((WORK / "in" / "yaml").glob("*.yaml")):
        good = f.stem in ("ok_tiny", "bom")
        # the model's context (seqlen) and the pruner's N:M support are known once the job runs
        expect = ACCEPT if good else ANY if f.stem in ("seqlen_huge", "structure_bad") else REFUSE
        cs.append(C(f"run-config-{f.stem}", ["run", f"{I}/yaml/{f.name}", "--print-config", "-o", f"{O}/r"], expect))
    for vid in ("missing", "folder", "empty", "binary", "latin1"):
        cs.append(C(f"run-config-generic-{vid}", ["run", GENERIC[vid].replace(".json", ".yaml"), "--print-config", "-o", f"{O}/r"],
                    ACCEPT if vid == "empty" else REFUSE))
    rs = lambda *sets: ["run", *[a for s in sets for a in ("--set", s)], "--print-config", "-o", f"{O}/r"]
    for s in ("model", "model.spec", "nosection.key=1", "model.nokey=1", "data.nsamples=[1", "data.nsamples=-1",
              "data.seqlen=abc", "pruning.sparsity=2", "allocation.budget=.nan", "evaluation.limit=-3", "model.device=tpu",
              "scoring.methods=[nope]", "model.spec=tiny-nothing", "data.bos=sometimes", "report.html=maybe"):
        cs.append(C(f"run-set-{s}", rs("model.spec=tiny-llama", s)))
    full = lambda *sets, out=f"{O}/r": ["run", "--set", "model.spec=tiny-llama", *[a for s in sets for a in ("--set", s)], "-o", out]
    cs += [C("run-data-root-missing", full(f"data.root={I}/nope")),
           C("run-calibration-binary", full(f"data.root={I}", "data.calibration=bin.txt")),
           C("run-calibration-latin1", full(f"data.root={I}", "data.calibration=latin1.txt")),
           C("run-seqlen-over-context", full("data.seqlen=1000")),
           C("run-tasks-missing", full("evaluation.tasks=[nope]")),
           C("run-output-dot", full(out=".")), C("run-output-is-config", ["run", f"{K}/ok.yaml", "-o", f"{K}/ok.yaml"], prep=[("copy", f"{I}/yaml/ok_tiny.yaml", f"{K}/ok.yaml")]),
           C("run-output-proc", full(out="/proc/layercap-probe/r")),
           C("run-output-foreign-nested", full(out=O)),
           C("run-ok-print-config", rs("model.spec=tiny-llama"), ACCEPT)]
    # 14. across commands: seeds, odd paths, odd names (cases the issue does not list)
    long_name = "x" * 300
    for sub, base in (("score", sc()), ("prune", pw("--sparsity", "0.5")), ("damage", dm()), ("evaluate", ev("--ppl", T)),
                      ("cmp-pruning", cp())):
        kind = "dir" if sub in ("prune", "cmp-pruning") else "file"
        tail = "" if kind == "dir" else ".json"
        cs += [C(f"{sub}-seed-negative", [*base, "--seed", "-1", "-o", f"{O}/x{tail}"], ANY),
               C(f"{sub}-seed-2^70", [*base, "--seed", str(2 ** 70), "-o", f"{O}/x{tail}"]),
               C(f"{sub}-out-name-too-long", [*base, "-o", f"{O}/{long_name}{tail}"]),
               C(f"{sub}-out-newline-name", [*base, "-o", f"{O}/a\nb{tail}"], ANY),
               C(f"{sub}-out-symlink-to-input", [*base, "-o", f"{K}/link{tail}"],
                 prep=[("symlink", T if kind == "file" else f"{I}/folder", f"{K}/link{tail}")])]
    cs += [C("finetune-seed-2^70", fo("--seed", str(2 ** 70))), C("finetune-out-name-too-long", [*ft(), "-o", f"{O}/{long_name}"]),
           C("finetune-train-folder", fo(train=f"{I}/tasks")), C("finetune-train-nodir", fo(train=f"{I}/tasks/nodir")),
           C("cmp-alloc-seeds-negative", cao("--seeds", "-1"), ANY), C("cmp-alloc-out-name-too-long", [*ca(), "-o", f"{O}/{long_name}"]),
           C("allocate-out-name-too-long", ["allocate", S, "--budget", "8", "-o", f"{O}/{long_name}.json"]),
           C("allocate-out-symlink-to-input", ["allocate", S, "--budget", "8", "-o", f"{K}/l.json"], prep=[("symlink", S, f"{K}/l.json")]),
           C("allocate-out-trailing-slash", ["allocate", S, "--budget", "8", "-o", f"{O}/newdir/"], ANY),
           C("allocate-unicode-names", ["allocate", f"{K}/u.json", "--budget", "8", "-o", f"{O}/a.json"], ACCEPT,
             prep=[("write", f"{K}/u.json", json.dumps({"layers": [{"name": n, "zeta2": 1, "params": 10} for n in ("caf\u00e9", "\u6f22", "a\tb")]}))]),
           C("allocate-many-layers", ["allocate", f"{K}/many.json", "--budget", "200000", "-o", f"{O}/a.json"], ACCEPT,
             prep=[("write", f"{K}/many.json", json.dumps({"layers": [{"name": f"l{i}", "zeta2": 1 + i % 7, "params": 10} for i in range(50000)]}))]),
           C("score-data-fifo-in-folder", so(data=f"{K}/d"), ACCEPT, prep=[("mkdir", f"{K}/d"), ("copy", T, f"{K}/d/a.txt"), ("fifo", f"{K}/d/pipe")]),
           C("score-data-fifo", so(data=f"{K}/pipe"), prep=[("fifo", f"{K}/pipe")]),
           C("score-dtype-float16-cpu", so("--dtype", "float16"), ANY),
           C("evaluate-tasks-train-only-dir", eo("--tasks", f"{K}/t"), ANY, prep=[("mkdir", f"{K}/t"), ("copy", TASK, f"{K}/t/train.jsonl")]),
           C("run-set-nsamples-1e400", rs("model.spec=tiny-llama", "data.nsamples=1e400")),
           C("run-set-seqlen-float", rs("model.spec=tiny-llama", "data.seqlen=16.5")),
           C("run-set-spec-empty", rs("model.spec=")),
           C("export-decisions-symlink-loop", ["export", f"{K}/loop.json", "--format", "json", "-o", f"{O}/t.json"],
             prep=[("symlink", f"{K}/loop.json", f"{K}/loop.json")])]
    # command-line faults common to all
    for sub in ("score", "prune", "allocate", "evaluate", "finetune", "export", "damage", "transfer", "run",
                "compare-pruning", "compare-allocation", "prune-ratios"):
        cs.append(C(f"{sub}-unknown-flag", [sub, "--no-such-flag"]))
    cs += [C("cli-unknown-command", ["nope"], sub="cli"), C("cli-no-command", [], ANY, sub="cli")]
    ids = [c["id"] for c in cs]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    assert not dup, dup
    return cs


# ----------------------------------------------------------------------------------------------
# running and classifying


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "<link>"
            elif p.is_file():
                out[str(p)] = _hash(p)
            elif p.is_dir():
                out[str(p)] = "<dir>"
    return out


def fill(a: str, case_dir: Path) -> str:
    return (a.replace(I, str(WORK / "in")).replace(O, str(case_dir / "out")).replace(M, str(WORK / "models"))
            .replace(K, str(case_dir)))


def env() -> dict:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    return e


def run_prep(case: dict, case_dir: Path) -> set[str]:
    """Carry out the case's preparation; returns the files that its own layercap runs wrote (a
    rerun may replace those; every other file the preparation made is the user's, protected)."""
    written: set[str] = set()
    for op, *a in case["prep"]:
        a = [fill(x, case_dir) if isinstance(x, str) else [fill(y, case_dir) for y in x] for x in a]
        if op == "mkdir":
            Path(a[0]).mkdir(parents=True, exist_ok=True)
        elif op == "write":
            Path(a[0]).parent.mkdir(parents=True, exist_ok=True)
            Path(a[0]).write_text(a[1])
        elif op == "write-glob":
            for p in Path(a[0]).parent.glob(Path(a[0]).name):
                p.write_text(a[1])
        elif op == "copy":
            shutil.copy(a[0], a[1])
        elif op == "symlink":
            os.symlink(a[0], a[1])
        elif op == "fifo":
            os.mkfifo(a[0])
        elif op == "copytree":
            shutil.copytree(a[0], a[1])
        elif op == "truncate-last-checkpoint":  # as if killed while saving it: no result yet, last checkpoint cut
            cks = sorted((Path(a[0]) / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            for f in cks[-1].rglob("*.safetensors") if cks else []:
                f.write_bytes(f.read_bytes()[:100])
            (Path(a[0]) / "finetune.json").unlink(missing_ok=True)
            shutil.rmtree(Path(a[0]) / "adapter", ignore_errors=True)
        elif op == "run":
            before = snapshot(case_dir)
            r = subprocess.run([sys.executable, "-m", "layercap", *a[0]], cwd=case_dir / "out", env=env(),
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"prep of {case['id']} failed: {r.stderr.strip().splitlines()[-1:]}")
            written |= {p for p, h in snapshot(case_dir).items() if before.get(p) != h}
        else:
            raise ValueError(op)
    return written


def classify(case, rc, err, before, protected, after, timed_out) -> str:
    """``before``: the case folder as the command found it; ``protected``: the files that must
    survive unchanged (the inputs and the user's files, not what the case's own earlier layercap
    runs wrote)."""
    if timed_out:
        return "TIMEOUT"
    if "Traceback" in err:
        return "TRACEBACK"
    changed = [p for p, h in protected.items() if after.get(p) != h]
    if changed:
        case["changed"] = changed[:5]
        return "LOST_FILE"
    if rc == 0:
        return "SILENT_ACCEPT" if case["expect"] == REFUSE else "OK"
    new = [p for p in after if p not in before]
    if new:
        case["new_files"] = new[:5]
        return "LEFTOVER"
    if case["expect"] == ACCEPT:
        return "FALSE_REFUSAL"
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "rerun with --debug for the traceback" in last:
        return "INTERNAL"
    if not (re.match(r"layercap [\w-]+: error: ", last) or re.match(r"(layercap [\w-]+|layercap): error: ", last)
            or last.startswith("usage:") or "error:" in last):
        return "BAD_MESSAGE"
    if "\x00" in err or "\ufffd" in err or (case["pattern"] and not re.search(case["pattern"], last)):
        return "BAD_MESSAGE"
    return "CLEAN"


def main() -> int:
    global WORK
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="only cases whose id contains this (comma-separated: any of these)")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--fork", action="store_true", help="fork each case from a process that imported torch once")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "results" / "probe_inputs.json"))
    opts = ap.parse_args()
    t0 = time.time()
    WORK = Path(tempfile.mkdtemp(prefix="layercap-probe-"))
    _write_inputs(WORK / "in")
    write_probe_inputs(WORK / "in")
    (WORK / "models").mkdir()
    write_models(WORK / "models")
    # a real ratios file, made by the program itself
    r = subprocess.run([sys.executable, "-m", "layercap", "prune-ratios", str(WORK / "in/scores.json"), "--sparsity", "0.5",
                        "-o", str(WORK / "in/ratios.json")], env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    all_cases = cases()
    wanted = opts.only.split(",") if opts.only else None
    todo = [c for c in all_cases if not wanted or any(w in c["id"] for w in wanted)]
    shared = snapshot(WORK / "in", WORK / "models")
    print(f"{len(todo)} cases ({len(all_cases)} in all) in {WORK}; setup {time.time() - t0:.1f} s", file=sys.stderr)
    if opts.fork:
        import torch  # noqa: F401  (imported once, before the children fork)
        import transformers  # noqa: F401

        import layercap.cli  # noqa: F401
    records, running, queue = [], {}, list(enumerate(todo))
    t_cases = time.time()
    while queue or running:
        while queue and len(running) < opts.jobs:
            n, case = queue.pop(0)
            case_dir = WORK / "cases" / f"{n:04d}"
            (case_dir / "out").mkdir(parents=True)
            (case_dir / "out" / "keep.txt").write_text("a file layercap did not write\n")
            try:
                written = run_prep(case, case_dir)
            except Exception as exc:  # a broken prep is the probe's fault: report it, do not classify
                records.append({**case, "outcome": "PREP_FAILED", "stderr_first": str(exc)[:300], "rc": None, "seconds": 0})
                continue
            argv = [fill(a, case_dir) for a in case["argv"]]
            before = snapshot(case_dir)
            protected = {p: h for p, h in before.items() if p not in written}  # the user's files
            err_path = case_dir.parent / f"{n:04d}.err"
            out_path = case_dir.parent / f"{n:04d}.out"
            start = time.time()
            if opts.fork:
                pid = os.fork()
                if pid == 0:  # child
                    try:
                        os.chdir(case_dir / "out")
                        fd_out, fd_err = os.open(out_path, os.O_WRONLY | os.O_CREAT), os.open(err_path, os.O_WRONLY | os.O_CREAT)
                        os.dup2(fd_out, 1)
                        os.dup2(fd_err, 2)
                        signal.alarm(int(opts.timeout))
                        sys.argv = ["layercap", *argv]
                        from layercap.cli import main as cli_main

                        code = cli_main(argv)
                    except SystemExit as exc:
                        code = exc.code if isinstance(exc.code, int) else 1
                    except BaseException:
                        import traceback

                        traceback.print_exc()
                        code = 1
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
                handle = pid
            else:
                handle = subprocess.Popen([sys.executable, "-m", "layercap", *argv], cwd=case_dir / "out", env=env(),
                                          stdout=open(out_path, "wb"), stderr=open(err_path, "wb"), start_new_session=True)
            running[n] = (case, case_dir, argv, before, protected, handle, start, err_path)
        time.sleep(0.05)
        for n in list(running):
            case, case_dir, argv, before, protected, handle, start, err_path = running[n]
            timed_out = False
            if opts.fork:
                pid, status = os.waitpid(handle, os.WNOHANG)
                if pid == 0:
                    continue
                rc = os.waitstatus_to_exitcode(status)
                timed_out = rc == -signal.SIGALRM
            else:
                rc = handle.poll()
                if rc is None:
                    if time.time() - start > opts.timeout:
                        os.killpg(handle.pid, signal.SIGKILL)
                        handle.wait()
                        rc, timed_out = -9, True
                    else:
                        continue
            del running[n]
            seconds = time.time() - start
            err = err_path.read_bytes().decode("utf-8", "replace")
            after = snapshot(case_dir)
            # the shared inputs must be untouched too
            now = snapshot(WORK / "in", WORK / "models")
            lost_shared = {p: h for p, h in shared.items() if now.get(p) != h}
            rec = dict(case)
            outcome = classify(rec, rc, err, before, {**protected, **lost_shared},
                               {**after, **{p: now.get(p) for p in lost_shared}}, timed_out)
            if lost_shared:
                shared = now  # report it once
            lines = [line for line in err.splitlines() if line.strip() and not line.lstrip().startswith(("Loading", "Writing", "\r"))]
            first = next((line for line in lines if "error" in line.lower() or "Traceback" in line), lines[-1] if lines else "")
            rec.update(command="layercap " + " ".join(argv).replace(str(WORK), "$PROBE"), outcome=outcome, rc=rc,
                       stderr_first=first.replace(str(WORK), "$PROBE")[:400], seconds=round(seconds, 2))
            if outcome == "TRACEBACK":
                rec["stderr_last"] = (lines[-1] if lines else "").replace(str(WORK), "$PROBE")[:400]
            rec.pop("prep")
            rec.pop("argv")
            records.append(rec)
            mark = "" if outcome in ("CLEAN", "OK") else "  <--"
            print(f"[{len(records):4d}/{len(todo)}] {outcome:<13} {seconds:6.1f}s {case['id']}{mark}", file=sys.stderr, flush=True)
    wall = time.time() - t0
    by = Counter(r["outcome"] for r in records)
    table = defaultdict(Counter)
    for r in records:
        table[r["sub"]][r["outcome"]] += 1
    cols = [c for c in ORDER + ["PREP_FAILED"] if by.get(c)]
    print(f"\n{'subcommand':<20}" + "".join(f"{c:>14}" for c in cols) + f"{'total':>8}")
    for sub in sorted(table):
        print(f"{sub:<20}" + "".join(f"{table[sub].get(c, 0):>14}" for c in cols) + f"{sum(table[sub].values()):>8}")
    print(f"{'all':<20}" + "".join(f"{by.get(c, 0):>14}" for c in cols) + f"{len(records):>8}")
    failures = sum(by.get(c, 0) for c in FAILURES)
    print(f"\n{len(records)} cases, {failures} failures, wall {wall:.0f} s (cases {time.time() - t_cases:.0f} s, "
          f"{'fork' if opts.fork else 'fresh interpreter per case'}, {opts.jobs} at a time)")
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"cases": len(records), "wall_s": round(wall, 1), "mode": "fork" if opts.fork else "spawn", "jobs": opts.jobs,
           "only": opts.only, "by_outcome": dict(by), "by_subcommand": {k: dict(v) for k, v in sorted(table.items())},
           "records": sorted(records, key=lambda r: r["id"])}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    if not opts.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 1 if failures else 0


WORK = Path(".")

if __name__ == "__main__":
    sys.exit(main())
