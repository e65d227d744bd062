import ast
import shutil
from pathlib import Path

import dagster as dg
import pytest

import retailsim_pipeline
from retailsim_pipeline.definitions import defs


def test_definitions_are_loadable():
    dg.Definitions.validate_loadable(defs)


def test_assets_carry_lineage_metadata():
    graph = defs.resolve_asset_graph()
    expected_groups = {"raw_transactions": "ingest", "basket_samples": "prep", "tensor_cache": "prep"}
    for name, group in expected_groups.items():
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == group
        assert node.code_version, name
        assert node.description and len(node.description) > 80, name
        assert node.kinds, name
        assert node.owners == ["team:retailsim"]
    assert graph.get(dg.AssetKey("basket_samples")).parent_keys == {dg.AssetKey("raw_transactions")}
    assert graph.get(dg.AssetKey("tensor_cache")).parent_keys == {dg.AssetKey("basket_samples")}
    assert graph.get(dg.AssetKey("raw_transactions")).is_partitioned
    checks = {k.name for k in graph.asset_check_keys}
    assert {"quarantine_rate_below_threshold", "splits_disjoint_and_ordered", "no_leakage",
            "manifest_consistent"} <= checks


#: Which of the package's own layers each layer may import (defs/, cli, definitions: anything).
#: defs/cli -> training/evaluation -> model/prep -> config; tracking (the MLflow package) sits beside
#: training and reads the model. evaluation scores with the batch assembly it shares with training. The
#: served model turns requests into inputs with prep.requests and scores them with the evaluation's own
#: evaluation.positions.request_logits (one implementation for serving and evaluation).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "prep": {"config", "prep"},
    "model": {"config", "model"},
    "tracking": {"config", "model", "tracking", "prep.requests", "evaluation.positions"},
    "training": {"config", "prep", "model", "training", "tracking"},
    "evaluation": {"config", "prep", "model", "evaluation", "training.batches", "training.curves"},
}
#: Third-party packages only some modules may import.
RESTRICTED = {"dagster": {"defs", "cli", "definitions"}, "dagster_pipes": {"training.pipes"},
              "dagster_k8s": {"defs"}, "mlflow": {"tracking"}}


def _module(rel: Path) -> str:
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_violations(root: Path) -> list[str]:
    """Every import in the package at ``root`` that breaks :data:`ALLOWED` / :data:`RESTRICTED`, and
    every import of another module's private name (``from x import _y``, ``x._y`` on an imported module)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        module = _module(rel)
        layer = module.split(".")[0]
        imported: list[tuple[str, int]] = []
        aliases: set[str] = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    imported.append((a.name, node.lineno))
                    if a.name.startswith("retailsim_pipeline"):
                        aliases.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.append((node.module, node.lineno))
                for a in node.names:
                    if node.module.startswith("retailsim_pipeline"):
                        aliases.add(a.asname or a.name)
                        imported.append((f"{node.module}.{a.name}", node.lineno))
                        if a.name.startswith("_"):
                            out.append(f"{rel}:{node.lineno}: imports the private name {a.name} of {node.module}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                out.append(f"{rel}:{node.lineno}: reads the private name {node.value.id}.{node.attr}")
        for name, line in imported:
            top = name.split(".")[0]
            if top in RESTRICTED and not any(module == m or module.startswith(m + ".") for m in RESTRICTED[top]):
                out.append(f"{rel}:{line}: imports {top} (only {', '.join(sorted(RESTRICTED[top]))} may)")
            if top != "retailsim_pipeline" or layer not in ALLOWED:
                continue
            target = name.split(".")[1:]
            if not target:
                continue
            allowed = ALLOWED[layer]
            if not any(".".join(target[:len(a.split("."))]) == a for a in allowed):
                out.append(f"{rel}:{line}: {layer} imports {'.'.join(target[:2])} "
                           f"(allowed: {', '.join(sorted(allowed)) or 'nothing of the package'})")
    return sorted(set(out))


def test_layers_depend_one_way():
    """prep/model/training/evaluation never import dagster or mlflow; layers point one way."""
    assert layer_violations(Path(retailsim_pipeline.__file__).parent) == []


@pytest.mark.parametrize("file, line, expected", [
    ("model/losses.py", "from retailsim_pipeline.training.batches import BatchAssembler",
     "model imports training.batches"),
    ("prep/samples.py", "from retailsim_pipeline.model.batch import Batch", "prep imports model.batch"),
    ("config.py", "from retailsim_pipeline.prep import schema", "config imports prep.schema"),
    ("evaluation/positions.py", "from retailsim_pipeline.training.trainer import Trainer",
     "evaluation imports training.trainer"),
    ("training/trainer.py", "import dagster_pipes", "imports dagster_pipes"),
    ("training/run.py", "import mlflow", "imports mlflow"),
    ("definitions.py", "from dagster_k8s import PipesK8sClient", "imports dagster_k8s"),
    ("evaluation/metrics.py", "from retailsim_pipeline.prep.cache_build import _publish",
     "imports the private name _publish"),
    ("evaluation/metrics.py", "import retailsim_pipeline.prep.cache_build as build_mod\nX = build_mod._publish",
     "reads the private name build_mod._publish"),
])
def test_a_planted_violation_is_caught(tmp_path, file, line, expected):
    copy = tmp_path / "retailsim_pipeline"
    shutil.copytree(Path(retailsim_pipeline.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    target.write_text(target.read_text() + "\n" + line + "\n")
    found = layer_violations(copy)
    assert len(found) >= 1 and all(f.startswith(file) for f in found), found
    assert any(expected in f for f in found), found
