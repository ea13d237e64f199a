"""`layercap run` end to end on a tiny random-init model: artefacts, report, caching, resume.

The run uses a private data root (a small generated text file and a 2-choice task file), so
it is self-contained and takes seconds. The report is also rendered in a real headless browser
(Debian ``chromium``) when one is installed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from layercap.experiments.config import load_config
from layercap.experiments.runner import TEST_HOOK_ENV, hash_output
from layercap.experiments.run import run_pipeline
from layercap.report.build import fmt_acc, fmt_ppl, spearman_matrix

REPO = Path(__file__).resolve().parents[1]
METHODS = ["gradnorm", "diag", "kfac", "alpha-hill", "owl"]
ALLOC_RULES = ["mdl", "uniform", "mola-2468", "mola-8642", "alphalora"]
RATIO_RULES = ["mdl", "uniform", "owl", "alphapruning"]


def _make_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while layer capacity pruning experts model weights data".split()
    lines = [" ".join(rng.choice(words, size=12)) + "." for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    with open(root / "tasks" / "mini.jsonl", "w") as fh:
        for i in range(16):
            fh.write(json.dumps({"context": f"Question: is the {words[i % len(words)]} quick?\nAnswer:",
                                 "choices": [" yes", " no"], "label": i % 2}) + "\n")
    return root


def tiny_overrides(root: Path) -> list[str]:
    return [
        "model.spec=tiny-llama", "model.tiny_layers=6", "model.device=cpu",
        f"data.root={root}", "data.calibration=corpus.txt", "data.nsamples=4", "data.seqlen=32", "data.start_token=256",
        f"scoring.methods=[{','.join(METHODS)}]", "scoring.batch_size=2",
        f"allocation.rules=[{','.join(ALLOC_RULES)}]", "allocation.budget=24",
        f"pruning.rules=[{','.join(RATIO_RULES)}]", "pruning.apply=[mdl,uniform]", "pruning.damage_levels=[0.25,0.5,0.75]",
        "evaluation.perplexity=[corpus.txt]", "evaluation.tasks=[mini.jsonl]", "evaluation.tasks_dir=tasks",
        "evaluation.ppl_tokens=256", "evaluation.ppl_seqlen=64", "evaluation.limit=12",
    ]


def _config(root: Path, *extra: str):
    return load_config(None, tiny_overrides(root) + list(extra))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return _make_data(tmp_path_factory.mktemp("tinydata"))


@pytest.fixture(scope="module")
def tiny_run(data_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    summary = run_pipeline(_config(data_root), run_dir)
    assert summary.skipped == []
    return run_dir


def _json(path: Path):
    return json.loads(path.read_text())


DETERMINISTIC = (["model", "model.json", "data/calibration.npy", "data/data.json"] + [f"scores/{m}.json" for m in METHODS]
                 + [f"allocation/{r}.json" for r in ALLOC_RULES] + [f"ratios/{r}.json" for r in RATIO_RULES]
                 + ["pruned/mdl", "pruned/mdl.json", "pruned/uniform", "pruned/uniform.json",
                    "eval/dense.json", "eval/mdl.json", "eval/uniform.json"])


def artefact_hashes(run_dir: Path) -> dict[str, str]:
    return {rel: hash_output(run_dir / rel) for rel in DETERMINISTIC}


def test_every_artefact_is_written_and_recorded(tiny_run):
    for rel in DETERMINISTIC + ["config.yaml", "stages.json", "report.md", "report.html"] + \
            [f"report_files/{n}.png" for n in ("scores", "allocation", "ratios")]:
        assert (tiny_run / rel).exists(), rel
    stages = _json(tiny_run / "stages.json")["stages"]
    expected = (["model", "data"] + [f"score:{m}" for m in METHODS] + [f"allocation:{r}" for r in ALLOC_RULES]
                + [f"ratios:{r}" for r in RATIO_RULES] + ["prune:mdl", "prune:uniform", "eval:dense", "eval:mdl",
                                                          "eval:uniform", "report"])
    assert list(stages) == expected
    for name, rec in stages.items():
        assert re.fullmatch(r"[0-9a-f]{64}", rec["input_hash"]), name
        assert rec["wall_time_s"] > 0 and rec["peak_rss_bytes"] > 50 * 2**20, name
        for rel, digest in rec["outputs"].items():
            assert hash_output(tiny_run / rel) == digest, (name, rel)
    # the resolved config is saved and reloads to the same config
    assert yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]["spec"] == "tiny-llama"


def test_decisions_are_consistent_with_the_config(tiny_run):
    from layercap.programs.records import Allocation, PruningRatios
    from layercap.scorefile import LayerScores

    blocks = _json(tiny_run / "model.json")["blocks"]
    assert len(blocks) == 6
    kfac = LayerScores.load(tiny_run / "scores/kfac.json")
    assert kfac.names == [b["name"] for b in blocks]
    for rule in ALLOC_RULES:
        alloc = Allocation.load(tiny_run / f"allocation/{rule}.json")
        assert alloc.names == kfac.names
        assert alloc.n.sum() == 24 and alloc.n.min() >= 1 and np.all(alloc.n == np.round(alloc.n)), rule
    prunable = np.array([b["prunable"] for b in blocks], dtype=float)
    for rule in RATIO_RULES:
        ratios = PruningRatios.load(tiny_run / f"ratios/{rule}.json")
        assert ratios.params.tolist() == prunable.astype(int).tolist(), rule
        assert abs(float((ratios.rho * prunable).sum() / prunable.sum()) - 0.5) < 1e-6, rule
    mdl = PruningRatios.load(tiny_run / "ratios/mdl.json")
    # the MDL program protects high-score blocks: ratio order is the reverse of q order (up to ties/clipping)
    q = kfac.q
    assert mdl.rho[np.argmax(q)] <= mdl.rho[np.argmin(q)]
    for rule in ("mdl", "uniform"):
        pruned = _json(tiny_run / f"pruned/{rule}.json")
        ratios = PruningRatios.load(tiny_run / f"ratios/{rule}.json")
        for layer, target in zip(pruned["layers"], ratios.rho):
            # measured zeros in the saved weights match the decided ratio (to rounding per matrix)
            assert abs(layer["sparsity"] - target) < 0.02, (rule, layer)
        assert abs(pruned["sparsity"] - 0.5) < 0.01


def test_pruned_checkpoints_hold_the_pruned_weights(tiny_run):
    from layercap.models import find_blocks, linear_weight, load_model

    model, _ = load_model(tiny_run / "pruned/mdl", with_tokenizer=False)
    pruned = _json(tiny_run / "pruned/mdl.json")
    for block, rec in zip(find_blocks(model), pruned["layers"]):
        zeros = sum(int((linear_weight(m) == 0).sum()) for m in block.linears.values())
        assert zeros == rec["zeros"]
    dense = _json(tiny_run / "eval/dense.json")
    mdl = _json(tiny_run / "eval/mdl.json")
    assert np.isfinite(dense["perplexity"]["corpus.txt"]) and dense["perplexity"] != mdl["perplexity"]


def test_report_shows_the_artefacts_numbers(tiny_run):
    from layercap.programs.records import Allocation
    from layercap.scorefile import LayerScores

    md = (tiny_run / "report.md").read_text()
    page = (tiny_run / "report.html").read_text()
    for variant in ("dense", "mdl", "uniform"):
        ev = _json(tiny_run / f"eval/{variant}.json")
        row = next(line for line in md.splitlines() if line.startswith(f"| {variant} |"))
        assert fmt_ppl(ev["perplexity"]["corpus.txt"]) in row
        assert fmt_acc(ev["accuracy"]["mini"]) in row and fmt_acc(ev["mean_accuracy"]) in row
        assert f"<td>{variant}</td>" in page
    # per-block table: the allocation counts of the artefacts, block by block
    mdl = Allocation.load(tiny_run / "allocation/mdl.json")
    for name, n in zip(mdl.names, mdl.n):
        line = next(l for l in md.splitlines() if l.startswith(f"| {name} |"))
        assert f"| {n:g} |" in line
    # Spearman table equals scipy's on the saved scores
    scores = {m: LayerScores.load(tiny_run / f"scores/{m}.json") for m in METHODS}
    names, mat = spearman_matrix(scores)
    kfac_row = next(l for l in md.splitlines() if l.startswith("| kfac |") and "." in l and len(l.split("|")) == len(METHODS) + 3)
    assert kfac_row == "| kfac | " + " | ".join(f"{mat[names.index('kfac'), j]:.2f}" for j in range(len(names))) + " |"
    # provenance: calibration hash, versions, config, timings
    data = _json(tiny_run / "data/data.json")
    assert data["sha256"] in md and data["sha256"] in page
    for word in ("torch", "transformers", "layercap", "python", "peak RSS", "Resolved config", "tiny-llama"):
        assert word in md
    # the plots are embedded in the HTML, byte for byte the PNGs written for the Markdown
    embedded = [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]
    files = [(tiny_run / f"report_files/{n}.png").read_bytes() for n in ("scores", "allocation", "ratios")]
    assert embedded == files
    for n in ("scores", "allocation", "ratios"):
        assert f"](report_files/{n}.png)" in md


def test_rerun_skips_everything_and_a_change_reruns_only_what_depends_on_it(tiny_run, data_root, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    before = artefact_hashes(run_dir)
    summary = run_pipeline(_config(data_root), run_dir)
    assert summary.ran == []
    summary = run_pipeline(_config(data_root, "pruning.sparsity=0.4"), run_dir)
    assert set(summary.ran) == ({f"ratios:{r}" for r in RATIO_RULES} | {"prune:mdl", "prune:uniform", "eval:mdl",
                                                                          "eval:uniform", "report"})
    after = artefact_hashes(run_dir)
    assert after["scores/kfac.json"] == before["scores/kfac.json"]
    assert after["ratios/mdl.json"] != before["ratios/mdl.json"]
    assert abs(_json(run_dir / "pruned/mdl.json")["sparsity"] - 0.4) < 0.01


def test_interrupted_run_resumes_to_the_same_artefacts(tiny_run, data_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "interrupted"
    monkeypatch.setenv(TEST_HOOK_ENV, "prune:uniform")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_config(data_root), run_dir)
    assert (run_dir / "pruned/mdl.json").exists() and not (run_dir / "pruned/uniform.json").exists()
    monkeypatch.delenv(TEST_HOOK_ENV)
    summary = run_pipeline(_config(data_root), run_dir)
    assert summary.ran[0] == "prune:uniform" and "score:kfac" in summary.skipped
    assert artefact_hashes(run_dir) == artefact_hashes(tiny_run)


def test_sigkilled_cli_run_resumes_to_the_same_artefacts(tiny_run, data_root, tmp_path):
    """A hard kill (SIGKILL, no cleanup) in the middle of the job, then the same command again."""
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "layercap", "run", "-o", str(run_dir)]
    for item in tiny_overrides(data_root):
        cmd += ["--set", item]
    # same intra-op thread count as the in-process reference run: float reductions (and so the
    # last bits of the scores) depend on it
    env = {**os.environ, TEST_HOOK_ENV: "eval:dense@kill", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -9, first.stderr[-2000:]
    stages = _json(run_dir / "stages.json")["stages"]
    assert "prune:uniform" in stages and "eval:dense" not in stages
    env.pop(TEST_HOOK_ENV)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "| dense |" not in second.stdout and "dense" in second.stdout  # plain-text results table
    assert artefact_hashes(run_dir) == artefact_hashes(tiny_run)
    assert re.search(r"ran 4 stage\(s\), skipped \d+", second.stdout)  # eval x3 + report


# ---- the report in a real browser ---------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]

PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({name: i.dataset.name, complete: i.complete,
                                                      w: i.naturalWidth, h: i.naturalHeight}));
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(imgs);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium not installed: `apt-get install -y chromium` to render the report in a real browser")
    return exe


def test_report_renders_in_a_headless_browser(tiny_run, chromium, tmp_path):
    page = (tiny_run / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "\n</body>"))
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stderr[-2000:]
    images = json.loads(match.group(1).replace("&quot;", '"'))
    assert [i["name"] for i in images] == ["scores", "allocation", "ratios"]
    for img in images:
        assert img["complete"] and img["w"] >= 600 and img["h"] >= 250, img  # decoded, real pixels
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", (tiny_run / "report.html").as_uri()],
                   capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000
    if os.environ.get("LAYERCAP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["LAYERCAP_KEEP_SCREENSHOT"])


def test_pruned_checkpoints_in_compressed_tensors_format(data_root, tmp_path):
    """pruning.save_format=compressed-tensors: the run's pruned checkpoint is the sparse format,
    smaller than the dense save, and evaluates to the same perplexity as the dense-format run."""
    pytest.importorskip("compressed_tensors")
    few = ["scoring.methods=[diag]", "allocation.rules=[uniform]", "allocation.scores=diag", "pruning.scores=diag",
           "pruning.rules=[uniform]", "pruning.apply=[uniform]", "evaluation.tasks=[]", "report.html=false"]
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    run_pipeline(_config(data_root, *few), dense_dir)
    run_pipeline(_config(data_root, *few, "pruning.save_format=compressed-tensors"), sparse_dir)
    config = json.loads((sparse_dir / "pruned/uniform/config.json").read_text())
    assert "sparsity_config" in json.dumps(config)
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*.safetensors"))  # noqa: E731
    assert size(sparse_dir / "pruned/uniform") < size(dense_dir / "pruned/uniform")
    ppl = lambda d: json.loads((d / "eval/uniform.json").read_text())["perplexity"]  # noqa: E731
    assert ppl(sparse_dir) == ppl(dense_dir)


def test_measured_pruning_rules_in_the_main_job(data_root, tmp_path):
    """mdl:obd / mdl:damage read damage tables made by their own stages, atp searches on the
    calibration windows; the report names the best applied rule and shows the damage heat maps."""
    few = ["scoring.methods=[diag]", "allocation.rules=[uniform]", "allocation.scores=diag", "pruning.scores=diag",
           "pruning.rules=[mdl:obd,mdl:damage,mdl:context,uniform,atp]", "pruning.apply=[mdl:obd,uniform]", "evaluation.tasks=[]",
           "report.html=false", "pruning.save_checkpoints=false"]
    run_dir = tmp_path / "run"
    summary = run_pipeline(_config(data_root, *few), run_dir)
    assert {"damage:obd", "damage:damage", "damage:context", "ratios:mdl:obd", "ratios:atp", "eval:mdl:obd"} <= set(summary.ran)
    assert set(_json(run_dir / "damage/context.json")["metadata"]["context"]["ratios"].values()) == {0.5}
    from layercap.programs.records import PruningRatios

    prunable = np.array([b["prunable"] for b in _json(run_dir / "model.json")["blocks"]], dtype=float)
    for rule in ("mdl-obd", "mdl-damage", "mdl-context", "atp"):
        rho = PruningRatios.load(run_dir / f"ratios/{rule}.json").rho
        assert abs(rho @ prunable / prunable.sum() - 0.5) < 1e-6, rule
    md = (run_dir / "report.md").read_text()
    assert "**Best rule: `" in md and "report_files/damage-obd.png" in md and "report_files/damage-damage.png" in md
    assert (run_dir / "eval/mdl-obd.json").is_file()
    # each pruned variant's calibration KL, and the report's pick by it (no evaluation data)
    kl = {r: _json(run_dir / f"pruned/{r}.json")["calibration"]["kl"] for r in ("mdl-obd", "uniform")}
    assert all(v > 0 for v in kl.values())
    pick = "mdl:obd" if kl["mdl-obd"] <= kl["uniform"] else "uniform"  # ties: the first applied rule
    assert f"the pick is `{pick}` (`mdl:obd` {kl['mdl-obd']:.4f}, `uniform` {kl['uniform']:.4f} nats/token)" in md
    again = run_pipeline(_config(data_root, *few), run_dir)
    assert again.ran == ["report"] or again.ran == []


def test_measured_utility_allocation_in_the_main_job(data_root, tmp_path):
    """mdl:measured adds a utility stage (calibration windows only), its allocation spends the
    budget, and the report shows the curves."""
    from layercap.errors import LayercapError
    from layercap.programs.records import Allocation
    from layercap.programs.utility import UtilityTable

    config = _config(data_root, "allocation.rules=[mdl:measured,uniform]", "allocation.utility_levels=[0,1,2,4]",
                     "allocation.utility_steps=2", "pruning.rules=[uniform]", "pruning.apply=[uniform]",
                     "scoring.methods=[gradnorm]", "allocation.scores=gradnorm", "pruning.scores=gradnorm")
    run_dir = tmp_path / "measured"
    summary = run_pipeline(config, run_dir)
    assert "utility" in summary.ran
    table = UtilityTable.load(run_dir / "utility" / "utility.json")
    assert table.levels == [0, 1, 2, 4] and len(table.blocks) == 6
    assert table.data["train"]["sha256"] != table.data["heldout"]["sha256"]
    alloc = Allocation.load(run_dir / "allocation" / "mdl-measured.json")
    assert alloc.spent == 24 and max(alloc.n) <= 4 and min(alloc.n) >= 1
    md = (run_dir / "report.md").read_text()
    assert "report_files/utility.png" in md and "| mdl:measured |" in md
    with pytest.raises(LayercapError, match="utility_levels"):
        _config(data_root, "allocation.utility_levels=[2,1]")


@pytest.mark.parametrize("rule", ["mdl:obd-linear", "mdl:damage-linear"])
def test_per_linear_pruning_rule_in_the_main_job(data_root, tmp_path, rule):
    """mdl:obd-linear (the default) and mdl:damage-linear (measured, what the README says to switch to)
    in the main job: a ratio per Linear on the same budget, pruned module by module; the report shows
    it per block (the weighted mean of the block's Linears)."""
    few = ["scoring.methods=[diag]", "allocation.rules=[uniform]", "allocation.scores=diag", "pruning.scores=diag",
           f"pruning.rules=[{rule},uniform]", f"pruning.apply=[{rule}]", "evaluation.tasks=[]",
           "report.html=false", "pruning.save_checkpoints=false", "pruning.sparsity=0.6"]
    run_dir = tmp_path / "run"
    summary = run_pipeline(_config(data_root, *few), run_dir)
    kind, file = rule.split(":")[1], rule.replace(":", "-")
    assert {f"damage:{kind}", f"ratios:{rule}", f"prune:{rule}"} <= set(summary.ran)
    from layercap.programs.records import PruningRatios

    ratios = PruningRatios.load(run_dir / f"ratios/{file}.json")
    blocks = _json(run_dir / "model.json")["blocks"]
    assert len(ratios.names) == sum(b["linears"] for b in blocks) and ratios.names[0].startswith(blocks[0]["name"] + ".")
    assert abs(float(ratios.rho @ ratios.params / ratios.params.sum()) - 0.6) < 1e-6 and ratios.rho.std() > 1e-3
    pruned = _json(run_dir / f"pruned/{file}.json")
    per_block = ratios.block_rho([b["name"] for b in blocks])
    for layer, want in zip(pruned["layers"], per_block):  # what the pruner did, block by block
        assert layer["target"] == pytest.approx(want) and layer["sparsity"] == pytest.approx(want, abs=0.02)
    assert f"{rule} rho" in (run_dir / "report.md").read_text()
