"""Hostile input on every command (allocate, prune-ratios, transfer, export, prune, damage, score,
evaluate, finetune, compare-allocation, compare-pruning, run): exit code 2, a one-line message naming the problem, no traceback, and nothing
changed on disk (inputs and output folder byte-identical). In-process (``layercap.cli.main``) on
tiny models, so each case takes well under a second. The cases at the end of ``CASES`` are the failure
classes found by the subprocess probe ``benchmarks/probe_inputs.py`` (which reuses this module's
inputs and cases).
"""

from __future__ import annotations

import json
import re

import pytest

from layercap.cli import main

LAYERS = [f"model.layers.{i}" for i in range(4)]
TEXT = ("The quick brown fox jumps over the lazy dog. Layer capacity allocation decides where a language "
        "model's parameters should go. Pruning removes weights; experts add capacity. ") * 20


def _scores_doc(**override):
    layers = [{"name": n, "zeta2": 1.0 + i, "params": 1000 * (i + 1)} for i, n in enumerate(LAYERS)]
    for layer in layers:
        layer.update(override)
    return {"schema": "layercap.scores/v1", "layers": layers}


def _write_inputs(d):
    """Every good and bad input file of the matrix, in folder ``d``."""
    d.mkdir()
    (d / "scores.json").write_text(json.dumps(_scores_doc()))
    (d / "text.txt").write_text(TEXT)
    (d / "other.txt").write_text(TEXT[::-1])  # evaluation text apart from the calibration text
    (d / "task.jsonl").write_text("\n".join(json.dumps({"context": f"Question {i}?", "choices": [" yes", " no"], "label": i % 2})
                                            for i in range(6)) + "\n")
    (d / "bin.json").write_bytes(b'\x00\x01\x02{"layers": []}')
    (d / "bin.txt").write_bytes(b"text then binary \x00\xff\xfe" * 50)
    (d / "latin1.json").write_bytes(json.dumps(_scores_doc()).replace("model.layers.0", "caf\u00e9").encode("latin-1"))
    (d / "latin1.csv").write_bytes("name,zeta2,params\ncaf\u00e9,1,10\nb,2,20\n".encode("latin-1"))
    (d / "latin1.txt").write_bytes(("caf\u00e9 " * 400).encode("latin-1"))
    (d / "latin1.jsonl").write_bytes(json.dumps({"context": "caf\u00e9?", "choices": [" a", " b"], "label": 0}, ensure_ascii=False).encode("latin-1"))
    (d / "short.csv").write_text("name,zeta2,params\na,1,10\nb,2\n")
    (d / "strcost.json").write_text(json.dumps(_scores_doc(cost="cheap")))
    (d / "bigparams.json").write_text(json.dumps(_scores_doc()).replace('"params": 1000}', '"params": 1e400}'))
    (d / "bigparams.csv").write_text("name,zeta2,params\na,1,1e400\nb,2,20\n")
    (d / "badcost.csv").write_text("name,cost\n" + "".join(f"{n},{'abc' if i == 2 else 1}\n" for i, n in enumerate(LAYERS)))
    (d / "unknowncost.json").write_text(json.dumps({**{n: 1 for n in LAYERS}, "model.layers.99": 2}))
    (d / "multi.json").write_text(json.dumps({"context": "Q?", "choices": [" a", " b"], "label": 0}, indent=2))
    (d / "label_float.jsonl").write_text(json.dumps({"context": "Q?", "choices": [" a", " b"], "label": 1.5}) + "\n")
    (d / "label_huge.jsonl").write_text('{"context": "Q?", "choices": [" a", " b"], "label": 1e400}\n')
    (d / "choices_str.jsonl").write_text(json.dumps({"context": "Q?", "choices": "ab", "label": 0}) + "\n")
    (d / "format_b_bad.jsonl").write_text(json.dumps({"question": "Q?", "choices": 5, "answerKey": "A"}) + "\n")
    (d / "format_a_bad.json").write_text(json.dumps([{"instruction": 5, "answer": "answer1"}]))
    (d / "folder").mkdir()
    (d / "calib").mkdir()
    (d / "calib" / "a.txt").write_text(TEXT)
    (d / "calib" / "b.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    (d / "fake.gguf").write_bytes(b"this is not a gguf file")
    (d / "broken").mkdir()
    (d / "broken" / "config.json").write_text('{"model_type": "lla')
    (d / "noweights").mkdir()
    (d / "noweights" / "config.json").write_text('{"model_type": "llama"}')
    (d / "schema.yaml").write_text("schema: layercap.run/v9\nmodel:\n  spec: tiny-llama\n")
    (d / "syntax.yaml").write_text("model:\n  spec: [tiny-llama\n")
    (d / "latin1.yaml").write_bytes("model:\n  spec: caf\u00e9\n".encode("latin-1"))
    (d / "huge_alloc.json").write_text(json.dumps({
        "schema": "layercap.allocation/v1", "rule": "manual", "budget": 400000.0, "unit": "experts", "integer": True,
        "layers": [{"name": n, "n": 100000, "cost": 1.0} for n in LAYERS], "mu": None, "binds": True,
        "spent": 400000.0, "metadata": {}}))
    # added with the hostile-input probe (benchmarks/probe_inputs.py)
    (d / "blank.txt").write_text("\n\n   \n")
    (d / "numbers.json").write_text(json.dumps([1, 2, 3]))
    (d / "extra_col.csv").write_text("name,zeta2,params,color\na,1,10,red\nb,2,20,blue\n")
    (d / "dup_header.csv").write_text("name,zeta2,params,zeta2\na,1,10,2\n")
    (d / "method_int.json").write_text(json.dumps({**_scores_doc(), "method": 5}))
    (d / "dup.yaml").write_text("model:\n  spec: tiny-llama\n  spec: tiny-gpt2\n")
    (d / "loop.json").symlink_to(d / "loop.json")  # a symbolic link to itself
    (d / "peft").mkdir()
    (d / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64}')
    (d / "ok_alloc.json").write_text(json.dumps({
        "schema": "layercap.allocation/v1", "rule": "manual", "budget": 4.0, "unit": "experts", "integer": True,
        "layers": [{"name": n, "n": 1, "cost": 1.0} for n in LAYERS], "mu": None, "binds": True,
        "spent": 4.0, "metadata": {}}))


def _snapshot(*folders) -> dict:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            out[str(p)] = f"<link {p.readlink()}>" if p.is_symlink() else p.read_bytes() if p.is_file() else "<dir>"
    return out


@pytest.fixture()
def work(tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(inp)
    out.mkdir()
    (out / "keep.txt").write_text("a file layercap did not write\n")
    monkeypatch.chdir(out)  # so that "-o ." is the output folder
    return inp, out


I, O = "{in}", "{out}"
SCORES = f"{I}/scores.json"
TINY = "tiny-llama"

# (id, argv with {in}/{out} placeholders, regex the message must match)
CASES = [
    # ---- allocate
    ("allocate-binary-json", ["allocate", f"{I}/bin.json", "--budget", "8", "-o", f"{O}/a.json"], r"bin\.json.*binary content.*byte offset 0"),
    ("allocate-latin1-json", ["allocate", f"{I}/latin1.json", "--budget", "8", "-o", f"{O}/a.json"], r"not UTF-8 text.*byte offset \d+"),
    ("allocate-latin1-csv", ["allocate", f"{I}/latin1.csv", "--budget", "8", "-o", f"{O}/a.json"], r"latin1\.csv.*not UTF-8"),
    ("allocate-csv-missing-field", ["allocate", f"{I}/short.csv", "--budget", "8", "-o", f"{O}/a.json"], r"line 3 has 2 field.*'params'"),
    ("allocate-string-cost", ["allocate", f"{I}/strcost.json", "--budget", "8", "-o", f"{O}/a.json"], r"cost = 'cheap'.*finite numbers > 0"),
    ("allocate-params-1e400-json", ["allocate", f"{I}/bigparams.json", "--budget", "8", "-o", f"{O}/a.json"], r"params = inf.*integer"),
    ("allocate-params-1e400-csv", ["allocate", f"{I}/bigparams.csv", "--budget", "8", "-o", f"{O}/a.json"], r"params = .*not finite"),
    ("allocate-scores-is-folder", ["allocate", f"{I}/folder", "--budget", "8", "-o", f"{O}/a.json"], r"is a folder, not a file"),
    ("allocate-missing-scores", ["allocate", f"{I}/nope.json", "--budget", "8", "-o", f"{O}/a.json"], r"does not exist"),
    ("allocate-overwrites-input", ["allocate", SCORES, "--budget", "8", "-o", SCORES], r"also an input"),
    ("allocate-output-dot", ["allocate", SCORES, "--budget", "8", "-o", "."], r"-o '\.' is a folder"),
    ("allocate-csv-twin-is-folder", ["allocate", SCORES, "--budget", "8", "-o", f"{O}/sub.json", "--csv"], r"--csv.*is a folder"),
    ("allocate-cost-unknown-layer", ["allocate", SCORES, "--budget", "8", "--cost", f"{I}/unknowncost.json", "-o", f"{O}/a.json"], r"model\.layers\.99.*does not have"),
    ("allocate-cost-not-number", ["allocate", SCORES, "--budget", "8", "--cost", f"{I}/badcost.csv", "-o", f"{O}/a.json"], r"'abc' is not a number"),
    ("allocate-beta-1e6", ["allocate", SCORES, "--budget", "8", "--beta", "1e6", "-o", f"{O}/a.json"], r"beta = 1e\+06.*underflow"),
    ("allocate-budget-nan", ["allocate", SCORES, "--budget", "nan", "-o", f"{O}/a.json"], r"budget = nan"),
    # ---- prune-ratios
    ("ratios-binary-scores", ["prune-ratios", f"{I}/bin.json", "--sparsity", "0.5", "-o", f"{O}/r.json"], r"binary content"),
    ("ratios-overwrites-input", ["prune-ratios", SCORES, "--sparsity", "0.5", "-o", SCORES], r"also an input"),
    ("ratios-sparsity-nan", ["prune-ratios", SCORES, "--sparsity", "nan", "-o", f"{O}/r.json"], r"sparsity nan"),
    ("ratios-csv-twin-is-folder", ["prune-ratios", SCORES, "--sparsity", "0.5", "-o", f"{O}/sub.json", "--csv"], r"--csv.*is a folder"),
    # ---- transfer
    ("transfer-ignored-budget", ["transfer", SCORES, SCORES, "--program", "pruning", "--sparsity", "0.5", "--budget", "8"], r"--budget.*ignored by --program pruning"),
    ("transfer-ignored-sparsity", ["transfer", SCORES, SCORES, "--program", "allocation", "--budget", "8", "--sparsity", "0.5"], r"--sparsity.*ignored by --program allocation"),
    ("transfer-overwrites-input", ["transfer", SCORES, f"{I}/latin1.json", "--program", "allocation", "--budget", "8", "-o", SCORES], r"also an input"),
    ("transfer-binary-target", ["transfer", SCORES, f"{I}/bin.json", "--program", "allocation", "--budget", "8"], r"binary content"),
    # ---- prune
    ("prune-deletes-unrelated-files", ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "-o", O], r"layercap did not write.*keep\.txt"),
    ("prune-output-dot", ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "-o", "."], r"did not write|current folder"),
    ("prune-output-is-file", ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "-o", f"{O}/keep.txt"], r"is a file"),
    ("prune-bad-blocks-regex", ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "--blocks", "model.(layers", "-o", f"{O}/p"], r"--blocks .* not a valid regular expression"),
    ("prune-bad-modules-regex", ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "--modules", "[", "-o", f"{O}/p"], r"--modules .* not a valid regular expression"),
    ("prune-device-tpu", ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "--device", "tpu", "-o", f"{O}/p"], r"--device 'tpu' is not a device"),
    ("prune-binary-ratios", ["prune", TINY, "--ratios", f"{I}/bin.json", "--method", "magnitude", "-o", f"{O}/p"], r"--ratios.*binary content"),
    ("prune-binary-data", ["prune", TINY, "--sparsity", "0.5", "--method", "wanda", "--data", f"{I}/bin.txt", "--nsamples", "2", "--seqlen", "16", "-o", f"{O}/p"], r"calibration data.*binary content"),
    ("prune-seqlen-over-context", ["prune", TINY, "--sparsity", "0.5", "--method", "wanda", "--data", f"{I}/text.txt", "--seqlen", "1000", "-o", f"{O}/p"], r"--seqlen 1000 exceeds the model's context of 256"),
    ("prune-fake-gguf", ["prune", f"{I}/fake.gguf", "--sparsity", "0.5", "--method", "magnitude", "-o", f"{O}/p"], r"not a GGUF file"),
    ("prune-truncated-config", ["prune", f"{I}/broken", "--sparsity", "0.5", "--method", "magnitude", "-o", f"{O}/p"], r"config\.json.*not valid JSON"),
    ("prune-missing-weights", ["prune", f"{I}/noweights", "--sparsity", "0.5", "--method", "magnitude", "-o", f"{O}/p"], r"no weight files"),
    # ---- score
    ("score-seqlen-over-gpt2-context", ["score", "tiny-gpt2", "--method", "gradnorm", "--data", f"{I}/text.txt", "--nsamples", "1", "--seqlen", "300", "-o", f"{O}/s.json"], r"--seqlen 300 exceeds the model's context of 256"),
    ("score-binary-file-in-data-folder", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/calib", "--nsamples", "1", "--seqlen", "8", "-o", f"{O}/s.json"], r"b\.bin.*binary content"),
    ("score-latin1-data", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/latin1.txt", "--nsamples", "1", "--seqlen", "8", "-o", f"{O}/s.json"], r"latin1\.txt.*not UTF-8"),
    ("score-device-tpu", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/text.txt", "--device", "tpu", "-o", f"{O}/s.json"], r"not a device"),
    ("score-output-folder", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/text.txt", "-o", O], r"is a folder"),
    ("score-binary-groups", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/text.txt", "--groups", f"{I}/bin.json", "-o", f"{O}/s.json"], r"--groups.*binary content"),
    ("score-bad-blocks-regex", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/text.txt", "--blocks", "(", "-o", f"{O}/s.json"], r"--blocks '\(' is not a valid regular expression"),
    ("score-overwrites-data", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/scores.json", "-o", f"{I}/scores.json"], r"also an input"),
    # ---- evaluate
    ("evaluate-binary-ppl", ["evaluate", TINY, "--seqlen", "32", "--ppl", f"{I}/bin.txt", "-o", f"{O}/e.json"], r"bin\.txt.*binary content"),
    ("evaluate-ppl-folder", ["evaluate", TINY, "--ppl", f"{I}/folder", "-o", f"{O}/e.json"], r"is a folder"),
    ("evaluate-latin1-task", ["evaluate", TINY, "--tasks", f"{I}/latin1.jsonl", "-o", f"{O}/e.json"], r"task file.*not UTF-8"),
    ("evaluate-multiline-json-task", ["evaluate", TINY, "--tasks", f"{I}/multi.json", "-o", f"{O}/e.json"], r"one JSON object, not a task file"),
    ("evaluate-overwrites-input", ["evaluate", TINY, "--ppl", f"{I}/text.txt", "-o", f"{I}/text.txt"], r"also an input"),
    ("evaluate-binary-reference", ["evaluate", TINY, "--ppl", f"{I}/text.txt", "--reference", f"{I}/bin.json", "-o", f"{O}/e.json"], r"evaluation result.*binary"),
    ("evaluate-seqlen-over-context", ["evaluate", TINY, "--ppl", f"{I}/text.txt", "--seqlen", "1000", "-o", f"{O}/e.json"], r"--seqlen 1000 exceeds"),
    ("evaluate-task-label-float", ["evaluate", TINY, "--tasks", f"{I}/label_float.jsonl", "-o", f"{O}/e.json"], r"label = 1\.5 must be a whole number"),
    ("evaluate-task-label-1e400", ["evaluate", TINY, "--tasks", f"{I}/label_huge.jsonl", "-o", f"{O}/e.json"], r"label = inf is not finite"),
    ("evaluate-task-choices-string", ["evaluate", TINY, "--tasks", f"{I}/choices_str.jsonl", "-o", f"{O}/e.json"], r"choices str"),
    ("evaluate-task-format-b-bad", ["evaluate", TINY, "--tasks", f"{I}/format_b_bad.jsonl", "-o", f"{O}/e.json"], r"line 1: expected 'question'"),
    ("evaluate-task-format-a-bad", ["evaluate", TINY, "--tasks", f"{I}/format_a_bad.json", "-o", f"{O}/e.json"], r"must be strings"),
    ("evaluate-limit-0", ["evaluate", TINY, "--ppl", f"{I}/text.txt", "--limit", "0", "-o", f"{O}/e.json"], r"--limit must be >= 1"),
    ("score-cg-tol-inf", ["score", TINY, "--method", "exact", "--data", f"{I}/text.txt", "--cg-tol", "inf", "-o", f"{O}/s.json"], r"--cg-tol must be a finite"),
    ("prune-nsamples-huge", ["prune", TINY, "--sparsity", "0.5", "--method", "wanda", "--data", f"{I}/text.txt", "--seqlen", "8", "--nsamples", "100000000000", "-o", f"{O}/p"], r"tokens, more than"),
    ("evaluate-device-tpu", ["evaluate", TINY, "--ppl", f"{I}/text.txt", "--device", "tpu", "-o", f"{O}/e.json"], r"not a device"),
    # ---- run (the main job)
    ("run-binary-config", ["run", f"{I}/bin.txt", "-o", f"{O}/r"], r"bin\.txt.*binary content"),
    ("run-latin1-config", ["run", f"{I}/latin1.yaml", "-o", f"{O}/r"], r"latin1\.yaml.*not UTF-8"),
    ("run-unknown-schema", ["run", f"{I}/schema.yaml", "-o", f"{O}/r"], r"schema 'layercap\.run/v9' is not one this version reads"),
    ("run-yaml-syntax", ["run", f"{I}/syntax.yaml", "-o", f"{O}/r"], r"not valid YAML at line \d"),
    ("run-output-is-file", ["run", "--set", "model.spec=tiny-llama", "-o", f"{O}/keep.txt"], r"exists and is not a directory"),
    ("run-foreign-folder", ["run", "--set", "model.spec=tiny-llama", "-o", O], r"holds files that layercap did not write"),
    # ---- compare-pruning
    ("cmp-pruning-foreign-folder", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--ppl", f"{I}/other.txt", "--nsamples", "2",
                                    "--seqlen", "16", "--rules", "uniform", "--methods", "magnitude", "-o", O], r"did not write"),
    ("cmp-pruning-output-is-file", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--ppl", f"{I}/other.txt", "--rules", "uniform",
                                    "-o", f"{O}/keep.txt"], r"is not a directory"),
    ("cmp-pruning-unknown-source", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--ppl", f"{I}/other.txt", "--rules", "mdl:nope",
                                    "-o", f"{O}/c"], r"score method 'nope' is not available"),
    ("cmp-pruning-binary-data", ["compare-pruning", TINY, "--data", f"{I}/bin.txt", "--ppl", f"{I}/other.txt", "--rules", "uniform",
                                 "--nsamples", "2", "--seqlen", "16", "-o", f"{O}/c"], r"binary content"),
    ("cmp-pruning-sparsity-1", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--ppl", f"{I}/other.txt", "--sparsity", "1.0",
                                "-o", f"{O}/c"], r"--sparsity: 1\.0 must lie in \(0, 1\)"),
    # ---- compare-allocation and finetune
    ("cmp-alloc-not-empty", ["compare-allocation", TINY, "--budget", "8", "--rules", "uniform", "--train", f"{I}/task.jsonl",
                             "-o", O], r"not empty; pass --resume"),
    ("cmp-alloc-foreign-with-resume", ["compare-allocation", TINY, "--budget", "8", "--rules", "uniform", "--train", f"{I}/task.jsonl",
                                       "--resume", "-o", O], r"no layercap sweep wrote"),
    ("cmp-alloc-budget-0", ["compare-allocation", TINY, "--budget", "0", "--rules", "uniform", "--train", f"{I}/task.jsonl",
                            "-o", f"{O}/c"], r"--budget must be > 0"),
    ("cmp-alloc-rank-0", ["compare-allocation", TINY, "--budget", "8", "--rules", "uniform", "--train", f"{I}/task.jsonl",
                          "--rank", "0", "-o", f"{O}/c"], r"--rank must be >= 1"),
    ("cmp-alloc-rule-twice", ["compare-allocation", TINY, "--budget", "8", "--rules", "uniform", "uniform", "--train",
                              f"{I}/task.jsonl", "-o", f"{O}/c"], r"--rules lists a rule twice"),
    ("finetune-huge-allocation", ["finetune", TINY, "--allocation", f"{I}/huge_alloc.json", "--train", f"{I}/task.jsonl",
                                  "-o", f"{O}/f"], r"400,000 units .* more than 4 x the model"),
    ("finetune-foreign-folder", ["finetune", TINY, "--allocation", f"{I}/ok_alloc.json", "--train", f"{I}/task.jsonl", "-o", O],
     r"holds files that layercap did not write"),
    ("finetune-lr-0", ["finetune", TINY, "--allocation", f"{I}/ok_alloc.json", "--train", f"{I}/task.jsonl", "--lr", "0",
                       "-o", f"{O}/f"], r"--lr must be > 0"),
    ("finetune-binary-allocation", ["finetune", TINY, "--allocation", f"{I}/bin.json", "--train", f"{I}/task.jsonl", "-o", f"{O}/f"],
     r"binary content"),
    # ---- found by the hostile-input probe (benchmarks/probe_inputs.py): one case per class
    # a file layercap did not write is never overwritten
    ("allocate-foreign-output-file", ["allocate", SCORES, "--budget", "8", "-o", f"{O}/keep.txt"], r"keep\.txt' exists and layercap did not write it"),
    ("ratios-foreign-output-file", ["prune-ratios", SCORES, "--sparsity", "0.5", "-o", f"{O}/keep.txt"], r"layercap did not write it"),
    ("damage-foreign-output-file", ["damage", TINY, "--data", f"{I}/text.txt", "-o", f"{O}/keep.txt"], r"layercap did not write it"),
    ("damage-output-is-data", ["damage", TINY, "--data", f"{I}/text.txt", "-o", f"{I}/text.txt"], r"also an input"),
    ("evaluate-foreign-output-file", ["evaluate", TINY, "--ppl", f"{I}/text.txt", "--seqlen", "32", "-o", f"{O}/keep.txt"], r"layercap did not write it"),
    ("export-foreign-output-file", ["export", f"{I}/ok_alloc.json", "--format", "json", "-o", f"{O}/keep.txt"], r"layercap did not write it"),
    ("export-peft-foreign-adapter", ["export", f"{I}/ok_alloc.json", "--format", "peft", "--model", TINY, "-o", f"{I}/peft"],
     r"adapter_config\.json' exists and layercap did not write it"),
    ("score-checkpoint-dir-holds-input", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/text.txt", "--seqlen", "8", "--checkpoint-dir", I,
                                          "-o", f"{O}/s.json"], r"--checkpoint-dir .* contains an input"),
    ("cmp-pruning-output-not-writable", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--ppl", f"{I}/other.txt",
                                         "--rules", "uniform", "-o", "/proc/layercap-test/c"], r"is not writable"),
    # options the chosen setting ignores are refused
    ("allocate-beta-ignored", ["allocate", SCORES, "--budget", "8", "--rule", "uniform", "--beta", "0.5", "-o", f"{O}/a.json"],
     r"--beta: ignored by --rule uniform"),
    ("ratios-gamma-ignored", ["prune-ratios", SCORES, "--sparsity", "0.5", "--gamma", "2", "-o", f"{O}/r.json"], r"--gamma: ignored in --mode exact"),
    ("transfer-eta-ignored", ["transfer", SCORES, SCORES, "--program", "allocation", "--budget", "8", "--eta", "2"],
     r"--eta: ignored by --program allocation"),
    ("score-cg-tol-ignored", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/text.txt", "--seqlen", "8", "--cg-tol", "0.01",
                              "-o", f"{O}/s.json"],
     r"--cg-tol: ignored by --method gradnorm"),
    ("prune-data-ignored", ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "--data", f"{I}/text.txt", "-o", f"{O}/p"],
     r"--data: ignored by --method magnitude"),
    ("damage-fisher-ignored", ["damage", TINY, "--data", f"{I}/text.txt", "--fisher", "empirical", "-o", f"{O}/d.json"],
     r"--fisher: ignored without --obd"),
    ("evaluate-limit-ignored", ["evaluate", TINY, "--ppl", f"{I}/text.txt", "--seqlen", "32", "--limit", "3", "-o", f"{O}/e.json"],
     r"--limit: ignored without --tasks"),
    ("export-method-ignored", ["export", f"{I}/ok_alloc.json", "--format", "peft", "--model", TINY, "--method", "wanda", "-o", f"{O}/a"],
     r"--method: ignored by --format peft"),
    ("finetune-top-k-ignored", ["finetune", TINY, "--allocation", f"{I}/ok_alloc.json", "--train", f"{I}/task.jsonl", "--adapter", "lora",
                                "--top-k", "3", "-o", f"{O}/f"], r"--top-k: ignored by --adapter lora"),
    ("finetune-limit-eval-ignored", ["finetune", TINY, "--allocation", f"{I}/ok_alloc.json", "--train", f"{I}/task.jsonl",
                                     "--limit-eval", "3", "-o", f"{O}/f"], r"--limit-eval: ignored without --eval"),
    ("cmp-pruning-generations-ignored", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--ppl", f"{I}/other.txt", "--rules", "uniform",
                                         "--seqlen", "16", "--eval-seqlen", "32", "--search-generations", "3", "-o", f"{O}/c"], r"--search-generations: ignored without the evopress"),
    # schema faults, checked reads
    ("allocate-csv-unknown-column", ["allocate", f"{I}/extra_col.csv", "--budget", "8", "-o", f"{O}/a.json"], r"unknown CSV column.*'color'"),
    ("allocate-csv-column-twice", ["allocate", f"{I}/dup_header.csv", "--budget", "8", "-o", f"{O}/a.json"], r"'zeta2' twice"),
    ("allocate-method-not-string", ["allocate", f"{I}/method_int.json", "--budget", "8", "-o", f"{O}/a.json"], r"'method' = 5 must be a string"),
    ("score-blank-data", ["score", TINY, "--method", "gradnorm", "--data", f"{I}/blank.txt", "--seqlen", "8", "-o", f"{O}/s.json"], r"blank\.txt: no text in it"),
    ("evaluate-numbers-as-text", ["evaluate", TINY, "--ppl", f"{I}/numbers.json", "--seqlen", "32", "-o", f"{O}/e.json"], r"record 0 is a int, not text"),
    ("run-yaml-key-twice", ["run", f"{I}/dup.yaml", "--print-config", "-o", f"{O}/r"], r"key 'spec' is given twice \(line 3\)"),
    ("run-unknown-tiny-model", ["run", "--set", "model.spec=tiny-nothing", "--print-config", "-o", f"{O}/r"], r"no such tiny model"),
    # numbers: finite, in range, within the model's context
    ("damage-seqlen-over-context", ["damage", TINY, "--data", f"{I}/text.txt", "--seqlen", "1000", "--nsamples", "1", "-o", f"{O}/d.json"],
     r"--seqlen 1000 exceeds the model's context of 256"),
    ("finetune-max-length-over-context", ["finetune", TINY, "--allocation", f"{I}/ok_alloc.json", "--train", f"{I}/task.jsonl",
                                          "--max-length", "100000", "-o", f"{O}/f"], r"--max-length 100000 exceeds the model's context"),
    ("finetune-lr-inf", ["finetune", TINY, "--allocation", f"{I}/ok_alloc.json", "--train", f"{I}/task.jsonl", "--lr", "inf", "-o", f"{O}/f"],
     r"--lr must be a finite number"),
    ("finetune-max-steps-negative", ["finetune", TINY, "--allocation", f"{I}/ok_alloc.json", "--train", f"{I}/task.jsonl",
                                     "--max-steps", "-5", "-o", f"{O}/f"], r"--max-steps must be >= 1 \(or -1"),
    ("cmp-alloc-calib-seqlen-over-context", ["compare-allocation", TINY, "--budget", "8", "--rules", "uniform", "--train", f"{I}/task.jsonl",
                                             "--calib-seqlen", "1000", "-o", f"{O}/c"], r"--calib-seqlen 1000 exceeds the model's context"),
    ("cmp-pruning-limit-0", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--tasks", f"{I}/task.jsonl", "--rules", "uniform",
                             "--limit", "0", "-o", f"{O}/c"], r"--limit must be >= 1"),
    ("cmp-pruning-max-ratio-1.5", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--ppl", f"{I}/other.txt", "--rules", "uniform",
                                   "--seqlen", "16", "--eval-seqlen", "32", "--max-ratio", "1.5", "-o", f"{O}/c"], r"--max-ratio 1\.5 must be < 1"),
    # seeds, names and links (cases the issue does not list)
    ("prune-seed-2^70", ["prune", TINY, "--sparsity", "0.5", "--method", "wanda", "--data", f"{I}/text.txt", "--seqlen", "16", "--seed", str(2 ** 70),
                         "-o", f"{O}/p"], r"--seed 1180591620717411303424: a seed is a whole number in \[0, 4,294,967,295\]"),
    ("cmp-alloc-seeds-negative", ["compare-allocation", TINY, "--budget", "8", "--rules", "uniform", "--train", f"{I}/task.jsonl",
                                  "--seeds", "-1", "-o", f"{O}/c"], r"--seeds -1: a seed is a whole number"),
    ("allocate-output-name-too-long", ["allocate", SCORES, "--budget", "8", "-o", f"{O}/{'x' * 300}.json"], r"more than the 255"),
    ("finetune-output-name-too-long", ["finetune", TINY, "--allocation", f"{I}/ok_alloc.json", "--train", f"{I}/task.jsonl",
                                       "-o", f"{O}/{'x' * 300}"], r"more than the 255"),
    ("prune-output-symlink", ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "-o", f"{O}/link"], r"is a symbolic link"),
    ("export-input-symlink-loop", ["export", f"{I}/loop.json", "--format", "json", "-o", f"{O}/t.json"], r"loop\.json' cannot be opened"),
    ("cmp-pruning-seqlen-over-context", ["compare-pruning", TINY, "--data", f"{I}/text.txt", "--ppl", f"{I}/other.txt", "--rules", "uniform",
                                         "--methods", "magnitude", "--nsamples", "1", "--seqlen", "257", "-o", f"{O}/c"], r"--seqlen 257 exceeds"),
]


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _fill(argv, inp, out):
    return [a.replace(I, str(inp)).replace(O, str(out)) for a in argv]


@pytest.mark.parametrize("argv,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(work, capsys, argv, pattern):
    inp, out = work
    if argv[0] in ("allocate", "prune-ratios") and "--csv" in argv:
        (out / "sub.csv").mkdir()
    if f"{O}/link" in argv:
        (out / "link").symlink_to(inp / "folder")

    before = _snapshot(inp, out)
    rc, _, err = _run(_fill(argv, inp, out), capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"layercap {argv[0]}: error: "), err
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "\x00" not in err and "\ufffd" not in err  # bytes of a binary input are never echoed
    assert _snapshot(inp, out) == before  # nothing written, nothing removed


def test_device_cuda_without_cuda(work, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    inp, out = work
    rc, _, err = _run(["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "--device", "cuda", "-o", f"{out}/p"], capsys)
    assert rc == 2 and "CUDA is not available" in err and "Traceback" not in err


def test_safety_net_one_line_and_debug(work, capsys, monkeypatch):
    from layercap import scorefile

    inp, out = work

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(scorefile.LayerScores, "load", classmethod(boom))
    rc, _, err = _run(["allocate", f"{inp}/scores.json", "--budget", "8", "-o", f"{out}/a.json"], capsys)
    assert rc == 2
    assert err.strip().splitlines() == ["layercap allocate: error: RuntimeError: boom second line (rerun with --debug for the traceback)"]
    with pytest.raises(RuntimeError, match="boom"):
        main(["allocate", f"{inp}/scores.json", "--budget", "8", "-o", f"{out}/a.json", "--debug"])


def test_read_only_output_folder(work, capsys, monkeypatch):
    """The temporary file cannot be created (read-only folder): a clear error, nothing written.
    (Simulated: the tests may run as root, for whom chmod does not make a folder read-only.)"""
    import tempfile

    inp, out = work
    before = _snapshot(inp, out)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    rc, _, err = _run(["allocate", f"{inp}/scores.json", "--budget", "8", "-o", f"{out}/a.json"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"cannot write .*a\.json.*Permission denied.*writable output folder", err), err
    assert _snapshot(inp, out) == before


def test_csv_failure_leaves_no_json(work, capsys, monkeypatch):
    """The CSV twin fails after the JSON was written: the JSON is removed again."""
    from layercap import io as lio

    inp, out = work
    real = lio.atomic_write_csv

    def failing(path, *a, **k):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(lio, "atomic_write_csv", failing)
    import layercap.programs.records as records

    monkeypatch.setattr(records, "atomic_write_csv", failing)
    before = _snapshot(inp, out)
    rc, _, err = _run(["allocate", f"{inp}/scores.json", "--budget", "8", "-o", f"{out}/a.json", "--csv"], capsys)
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert _snapshot(inp, out) == before
    assert real is not failing


def test_good_inputs_that_used_to_fail(work, capsys):
    """A CSV with a UTF-8 BOM, huge but finite scores, and an upper bound that binds."""
    inp, out = work
    (inp / "bom.csv").write_bytes(b"\xef\xbb\xbf" + b"name,zeta2,params\na,1,10\nb,2,20\n")
    rc, _, err = _run(["allocate", f"{inp}/bom.csv", "--budget", "4", "-o", f"{out}/bom.json"], capsys)
    assert rc == 0, err
    (inp / "huge.json").write_text(json.dumps(_scores_doc(zeta2=1e308)))
    rc, _, err = _run(["allocate", f"{inp}/huge.json", "--budget", "8", "-o", f"{out}/huge.json"], capsys)
    assert rc == 0, err
    ns = [layer["n"] for layer in json.loads((out / "huge.json").read_text())["layers"]]
    assert ns == [2, 2, 2, 2]  # equal scores: equal shares (q was 0 everywhere before)
    rc, stdout, err = _run(["allocate", SCORES.replace(I, str(inp)), "--budget", "40", "--max", "2", "-o", f"{out}/m.json"], capsys)
    assert rc == 0 and "spent 8 of 40 (does not bind)" in stdout


def test_prune_rewrites_only_its_own_folder(work, capsys):
    inp, out = work
    target = out / "pruned"
    argv = ["prune", TINY, "--sparsity", "0.5", "--method", "magnitude", "--quiet", "-o", str(target)]
    assert _run(argv, capsys)[0] == 0
    assert (target / ".layercap-output.json").is_file()
    assert _run(argv, capsys)[0] == 0  # a folder layercap wrote may be replaced
    (target / "notes.txt").write_text("mine")
    before = _snapshot(out)
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "notes.txt" in err
    assert _snapshot(out) == before
    empty = out / "empty"
    empty.mkdir()
    assert _run([*argv[:-1], str(empty)], capsys)[0] == 0  # an empty folder is fine


def test_score_checkpoint_dir_keeps_foreign_files(work, capsys):
    inp, out = work
    ck = out / "ck"
    ck.mkdir()
    (ck / "mine.txt").write_text("keep me")
    rc, _, err = _run(["score", TINY, "--method", "diag", "--data", f"{inp}/text.txt", "--nsamples", "2", "--seqlen", "8",
                       "--checkpoint-dir", str(ck), "--checkpoint-every", "1", "--quiet", "-o", f"{out}/s.json"], capsys)
    assert rc == 0, err
    assert [p.name for p in ck.iterdir()] == ["mine.txt"]


def test_single_item_task_writes_valid_json(work, capsys):
    """n = 1 item: the standard error is undefined (NaN); the eval JSON stores null and reads back."""
    import math

    from layercap.evaluate import EvalResult

    inp, out = work
    rc, _, err = _run(["evaluate", TINY, "--tasks", f"{inp}/task.jsonl", "--limit", "1", "--quiet", "-o", f"{out}/e.json"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "e.json").read_text())
    assert doc["tasks"]["task"]["acc_stderr"] is None
    assert math.isnan(EvalResult.load(out / "e.json").tasks["task"].acc_stderr)
