"""Layering, one IGNORE_INDEX, configs as pure differences, no dead code, no citations outside the repo."""

import ast
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOWER_LAYERS = ("models", "data", "losses", "diagnostics", "metrics")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.split() if (ROOT / line).exists()]


def _source_files() -> list[Path]:
    return [p for p in _tracked("*.py") if p.relative_to(ROOT).parts[0] != "tests"]


def _imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_lower_layers_never_import_recipes():
    offenders = []
    for path in _source_files():
        if path.relative_to(ROOT).parts[0] in LOWER_LAYERS:
            imported = _imported_modules(ast.parse(path.read_text()))
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in imported if m.split(".")[0] == "recipes"]
    assert not offenders


def _is_minus_100(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and node.operand.value == 100
    )


def test_one_ignore_index_constant():
    definitions, literals = [], []
    for path in _source_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "IGNORE_INDEX" for t in node.targets
            ):
                definitions.append(str(path.relative_to(ROOT)))
            elif _is_minus_100(node):
                literals.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert definitions == ["models/segments.py"]
    assert literals == ["models/segments.py:10"]


def test_no_citation_of_paths_outside_the_repo():
    cited = [
        str(p.relative_to(ROOT))
        for p in _tracked("*.py", "*.md", "*.yaml")
        if p != Path(__file__).resolve()
        and (
            "/work/shared" in p.read_text()
            or "../shared/" in p.read_text()
            or "OBJECTIVES.md" in p.read_text()
        )
    ]
    assert not cited


def _flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_synthetic_avsr_data_inherits_lrs3_and_keeps_only_differences():
    synthetic = yaml.safe_load((ROOT / "conf/data/synthetic_avsr.yaml").read_text())
    lrs3 = yaml.safe_load((ROOT / "conf/data/lrs3.yaml").read_text())
    assert "lrs3" in synthetic["defaults"]
    repeated = [k for k, v in synthetic.items() if k != "defaults" and k in lrs3 and lrs3[k] == v]
    assert not repeated


@pytest.mark.parametrize("name", ["lm_adl", "lm_meap", "lm_decorr"])
def test_lm_experiments_restate_no_objective_default(name):
    experiment = yaml.safe_load((ROOT / f"conf/experiment/{name}.yaml").read_text())
    for objective, settings in (experiment.get("objective") or {}).items():
        defaults = yaml.safe_load((ROOT / f"conf/objective/{objective}.yaml").read_text())[objective]
        restated = {k: v for k, v in _flatten(settings).items() if _flatten(defaults).get(k) == v}
        assert not restated, f"{name} restates {objective} defaults {restated}"


@pytest.mark.parametrize(
    "module, name",
    [
        ("models.attention_capture", "capture_queries_keys"),
        ("models.layer_subset", "load_gguf_layer_subset"),
        ("losses.meap", "expected_mask_count"),
    ],
)
def test_dead_helpers_are_gone(module, name):
    assert not hasattr(__import__(module, fromlist=[name]), name)


def test_corpus_wer_keeps_no_unused_state():
    from metrics.wer import CorpusWER

    assert "errors" not in CorpusWER()._defaults


def test_skip_metrics_is_what_the_avsr_recipe_logs():
    source = (ROOT / "recipes/avsr.py").read_text()
    assert "skip_metrics(" in source and 'f"data/skipped_' not in source
