"""The import rule of the architecture (README, "Layout"): `coltran/` is the model library and imports no Ray, no
MLflow and nothing of `pipelines/` (the distributed layer and the command line above it), neither at module level
nor inside a function. Checked on the import graph read from the code's syntax trees, and in a fresh interpreter
that imports every module of `coltran` and then looks at `sys.modules`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "mlflow", "pipelines")


def _modules(package: str) -> dict[str, Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(module: str, path: Path) -> set[str]:
    """Every module an `import` or `from ... import` names anywhere in the file (relative ones resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, up `level - 1` packages
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = package[: len(package) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module)
    return found


def test_no_coltran_module_imports_ray_mlflow_or_pipelines():
    modules = _modules("coltran")
    assert len(modules) > 20, sorted(modules)  # the walk found the package
    bad = {name: sorted(i for i in _imports(name, path) if i.split(".")[0] in FORBIDDEN)
           for name, path in modules.items()}
    bad = {name: found for name, found in bad.items() if found}
    assert not bad, f"coltran/ must not import {FORBIDDEN}: {bad}"


def test_importing_all_of_coltran_loads_no_ray_mlflow_or_pipelines():
    code = ("import importlib, json, pkgutil, sys\n"
            "import coltran\n"
            "names = [m.name for m in pkgutil.walk_packages(coltran.__path__, 'coltran.')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            f"print(json.dumps({{'modules': names, 'loaded': sorted(m for m in sys.modules "
            f"if m.split('.')[0] in {FORBIDDEN!r})}}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["modules"]) > 20
    assert result["loaded"] == [], f"importing coltran loaded {result['loaded']}"


def test_the_command_line_is_the_outermost_layer():
    """The `coltran` console script's module lives in pipelines/ (it imports both packages)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module = scripts["coltran"].split(":")[0]
    assert module.split(".")[0] == "pipelines", scripts
    assert module in _modules("pipelines")
