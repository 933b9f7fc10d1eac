"""Dependencies point one way: jobs, serve -> platform -> model; and each concern has one home (checked on
the source, by AST, plus one fresh-interpreter import)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vgmedgen"
SOURCES = sorted(
    [*PKG.rglob("*.py"), *(PKG.parent / "jobs").glob("*.py"), *(PKG.parent / "benchmarks").glob("*.py")]
)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.add("." * node.level + (node.module or ""))
    return names


def _violations(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for f in sorted((PKG / folder).rglob("*.py")):
        for name in _imports(f):
            if name.startswith("."):
                bad.append(
                    f"{f.relative_to(PKG.parent)}: relative import {name!r} (use absolute vgmedgen.* imports)"
                )
            elif any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{f.relative_to(PKG.parent)}: imports {name}")
    return bad


def test_model_imports_no_ray_mlflow_platform_or_serve():
    assert _violations("model", ("ray", "mlflow", "vgmedgen.platform", "vgmedgen.serve")) == []


def test_platform_does_not_import_serve():
    assert _violations("platform", ("vgmedgen.serve",)) == []


def test_the_scan_sees_real_imports(tmp_path: Path):
    f = tmp_path / "m.py"
    f.write_text(
        "import ray.train\nfrom mlflow import log_metric\ndef f():\n    import vgmedgen.platform.config\n"
    )
    assert {"ray.train", "mlflow", "vgmedgen.platform.config"} <= _imports(f)


def test_no_top_level_platform_package():
    assert not (PKG.parent / "platform" / "__init__.py").exists()


def _rel(path: Path) -> str:
    return str(path.relative_to(PKG.parent))


def _importers_of(module: str) -> list[str]:
    return [_rel(f) for f in SOURCES if any(n == module or n.startswith(module + ".") for n in _imports(f))]


def _config_module(name: str) -> bool:
    """A platform config module: ``vgmedgen.platform.config`` or a ``config`` module of a platform package."""
    return name.startswith("vgmedgen.platform.") and name.rsplit(".", 1)[-1] == "config"


def test_config_modules_import_only_config_modules():
    """Loading a config (every job, every Serve replica does) pulls in no platform machinery; the model's own
    configs live beside their models in vgmedgen.model, which never imports the platform."""
    bad = []
    for f in sorted((PKG / "platform").rglob("config.py")):
        for name in _imports(f):
            if name.startswith("vgmedgen.platform") and not _config_module(name):
                bad.append(f"{_rel(f)}: imports {name}")
    assert bad == []


def test_loading_the_config_loads_no_metrics_or_tracking_library():
    code = (
        "import sys, vgmedgen.platform.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch_fidelity', 'monai', 'mlflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_config_and_the_visual_and_align_stages_load_no_diffusers():
    """Every Ray worker reads the experiment config, and the visual and align stages' workers never build the
    generator: neither may import diffusers (or transformers through it), seconds of start-up per worker."""
    code = (
        "import sys, vgmedgen.platform.config, vgmedgen.platform.training.stages, vgmedgen.platform.training.loop; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_only_the_tracking_module_imports_mlflow():
    assert _importers_of("mlflow") == ["vgmedgen/platform/tracking.py"]


def test_hashlib_only_in_the_storage_helpers():
    assert _importers_of("hashlib") == ["vgmedgen/platform/storage.py"]


def test_a_torch_trainer_is_built_in_one_module():
    builders = []
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "TorchTrainer"
            ):
                builders.append(_rel(f))
    assert builders == ["vgmedgen/platform/training/trainer.py"]


def test_one_resolver_of_model_references():
    """Only the tracking module turns a registry reference into a model version (``resolve_model``)."""
    registry_calls = {"get_model_version_by_alias", "download_artifacts"}
    callers = set()
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in registry_calls:
                callers.add(_rel(f))
    assert callers == {"vgmedgen/platform/tracking.py"}
    definers = [
        _rel(f)
        for f in SOURCES
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name in {"resolve_model", "resolve_model_version"}
    ]
    assert definers == ["vgmedgen/platform/tracking.py"]


def test_run_names_are_hashed_in_one_module():
    """Run, net, job and version names come from vgmedgen.platform.runs: nobody else calls stable_hash."""
    callers = set()
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "stable_hash":
                callers.add(_rel(f))
    assert callers <= {"vgmedgen/platform/runs.py", "vgmedgen/platform/storage.py"}
