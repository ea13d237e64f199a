"""The pipeline config: defaults, strict validation, --set overrides, data paths."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from layercap.errors import LayercapError
from layercap.experiments.config import SECTIONS, PipelineConfig, config_table, default_config_text, load_config


def test_embedded_default_lists_every_field_and_loads():
    doc = yaml.safe_load(default_config_text())
    for section, cls in SECTIONS.items():
        assert set(doc[section]) == {f.name for f in fields(cls)}, section
    config = load_config()
    assert config.model.spec == "smollm2"
    assert config.scoring.methods[:3] == ["gradnorm", "diag", "kfac"]
    assert config.allocation.budget == 120 and config.allocation.lower == 1
    assert config.pruning.sparsity == 0.5 and config.pruning.apply == ["mdl:obd-linear", "uniform"]


def test_roundtrip_through_dict_and_yaml(tmp_path):
    config = load_config(None, ["pruning.sparsity=0.6", "scoring.methods=[gradnorm,kfac]", "allocation.rules=[mdl,uniform]",
                                "pruning.rules=[mdl,uniform]", "pruning.apply=[mdl,uniform]"])
    again = PipelineConfig.from_dict(config.to_dict())
    assert again == config
    path = config.save(tmp_path / "c.yaml")
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, needles",
    [
        ("scoring.methodz=[kfac]", ["'methodz'", "methods, batch_size, damping, options"]),
        ("modle.spec=x", ["'modle'", "model, data, scoring"]),
        ("pruning.sparsity=1.5", ["pruning.sparsity", "[0.0, 1.0]"]),
        ("pruning.method=obs", ["pruning.method", "magnitude, wanda, sparsegpt"]),
        ("scoring.methods=[kfac,fisher]", ["scoring.methods", "'fisher'", "gradnorm, diag, kfac"]),
        ("allocation.alpha=-2", ["allocation.alpha", "'auto'"]),
        ("data.nsamples=0", ["data.nsamples", "integer >= 1"]),
        ("data.nsamples=2.5", ["data.nsamples", "integer"]),
        ("model.device=gpu", ["model.device", "auto, cpu, cuda"]),
        ("pruning.structure=4:2", ["pruning.structure", "N:M"]),
        ("report.html=maybe", ["report.html", "true or false"]),
        ("pruning.apply=[layerif]", ["pruning.apply", "'layerif'", "pruning.rules"]),
        ("allocation.upper=0.5", ["allocation.upper", "allocation.lower"]),
        ("scoring.methods=[gradnorm,kfac]", ["alphalora", "alpha-hill", "scoring.methods"]),
        ("nodot=1", ["section.key"]),
    ],
)
def test_bad_override_names_the_key_and_the_allowed_values(override, needles):
    with pytest.raises(LayercapError) as err:
        load_config(None, [override])
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_bad_file_key_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pruning:\n  sparsty: 0.5\n")
    with pytest.raises(LayercapError, match=r"unknown key 'sparsty'.*allowed keys: scores, rules, apply, sparsity"):
        load_config(path)
    path.write_text("evaluation:\n  limit: -3\n")
    with pytest.raises(LayercapError, match=r"evaluation.limit = -3.*integer >= 1"):
        load_config(path)
    with pytest.raises(LayercapError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_user_file_overrides_only_what_it_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  spec: tiny-llama\npruning:\n  sparsity: 0.3\n")
    config = load_config(path, ["pruning.sparsity=0.4"])
    assert config.model.spec == "tiny-llama"
    assert config.model.dtype == "float32"  # default kept
    assert config.pruning.sparsity == 0.4  # --set wins over the file


def test_set_values_are_parsed_as_yaml():
    config = load_config(None, ["allocation.upper=8", "evaluation.limit=null", "scoring.options={seed: 3}",
                                "evaluation.tasks=boolq, ARC-Easy"])
    assert config.allocation.upper == 8.0
    assert config.evaluation.limit is None
    assert config.scoring.options == {"seed": 3}
    assert config.evaluation.tasks == ["boolq", "ARC-Easy"]


def test_data_root_env_override_and_path_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCAP_SHARED_DATA", str(tmp_path))
    config = load_config()
    assert config.data_path(config.data.calibration) == tmp_path / "corpora/wikitext-2-raw/wiki.test.raw"
    # an explicit value beats the environment variable
    assert load_config(None, ["data.root=/elsewhere"]).data.root == "/elsewhere"
    monkeypatch.delenv("LAYERCAP_SHARED_DATA")
    monkeypatch.chdir(tmp_path)
    config = load_config()
    assert config.data_path("x.txt") == tmp_path.parent / "shared/data/x.txt"
    assert config.data_path("/abs/file.txt") == Path("/abs/file.txt")


def test_config_table_documents_every_field():
    table = config_table()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"`{section}.{f.name}`" in table
            assert f.metadata["doc"]


def test_readme_config_table_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert config_table().strip() in readme, "regenerate the README table with layercap.experiments.config.config_table()"


def test_cli_rejects_a_bad_config_before_writing_anything(tmp_path, capsys):
    from layercap.cli import main

    out = tmp_path / "run"
    assert main(["run", "--set", "pruning.sparsty=0.5", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sparsty'" in err and "sparsity" in err
    assert not out.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("scoring:\n  methods: [kfac, hessian]\n")
    assert main(["run", str(bad), "-o", str(out)]) == 2
    assert "'hessian'" in capsys.readouterr().err and not out.exists()


def test_cli_print_config_prints_the_resolved_config(tmp_path, capsys):
    from layercap.cli import main

    assert main(["run", "--set", "pruning.sparsity=0.7", "--print-config", "-o", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    doc = yaml.safe_load(printed.split("# resolved config:\n", 1)[1])
    assert doc["pruning"]["sparsity"] == 0.7 and doc["model"]["spec"] == "smollm2"
    assert not (tmp_path / "r").exists()


def test_every_example_config_is_valid():
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)


def test_missing_data_or_model_fails_before_writing(tmp_path, capsys):
    from layercap.cli import main

    out = tmp_path / "run"
    assert main(["run", "--set", f"data.root={tmp_path}", "--set", "model.spec=tiny-llama", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data.calibration" in err and "LAYERCAP_SHARED_DATA" in err and not out.exists()
    assert main(["run", "--set", "model.spec=tiny-nosuch", "-o", str(out)]) == 2
    assert "tiny-llama" in capsys.readouterr().err and not out.exists()
    assert main(["run", "--set", f"model.spec={tmp_path / 'nomodel'}", "-o", str(out)]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()


def test_readme_documents_every_config_key_and_the_run_flags():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- section:main-job -->", 1)[1].split("<!-- /section:main-job -->", 1)[0]
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"`{name}.{f.name}`" in section, f"{name}.{f.name} is not documented in README (main-job)"
    for flag in ("--set", "-o", "--print-config", "LAYERCAP_SHARED_DATA", "stages.json", "report.html"):
        assert flag in section, flag


def test_embedded_yaml_restates_the_dataclass_defaults():
    from layercap.experiments.config import _default_of

    doc = yaml.safe_load(default_config_text())
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if (section, f.name) != ("data", "root"):  # the env-dependent one
                assert doc[section][f.name] == _default_of(f), f"{section}.{f.name}"


def test_config_lists_every_registered_pruner_and_score_method():
    from layercap.apply.prune import PRUNERS
    from layercap.experiments.config import PRUNE_METHODS, SCORE_METHODS
    from layercap.scores import available_methods

    assert set(PRUNE_METHODS) == set(PRUNERS)
    assert sorted(SCORE_METHODS) == available_methods() and "kfac" in SCORE_METHODS
