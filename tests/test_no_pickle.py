"""No pickle on any load path of the package: a static read of every module under scope_ray/.

Weights, checkpoints and tables may come from someone else (a shared bucket, a downloaded file);
unpickling them runs arbitrary code. The package loads safetensors, JSON, Parquet, and
``torch.load(..., weights_only=True)`` (tensors and plain containers only) — this test keeps it so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "scope_ray"
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib"}
PICKLE_LOADS = {"load", "loads", "Unpickler"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool | None:
    """True / False when ``name=`` is given as a literal equal / unequal to ``value``; None when absent
    (and False when given but not a literal: the reader cannot tell, so it does not count as safe)."""
    for kw in call.keywords:
        if kw.arg == name:
            return isinstance(kw.value, ast.Constant) and kw.value.value is value
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """``import torch as th`` -> {"th": "torch"}; the names calls are resolved through."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update({a.asname: a.name for a in node.names if a.asname})
    return out


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """``"file:line: what"`` for every pickle import or pickle-capable load in ``source``."""
    found = []
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[-1] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[-1]
            names = {a.name for a in node.names}
            if mod in PICKLE_MODULES or names & PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import {', '.join(sorted(names))}")
            if node.module in ("torch", "torch.serialization") and "load" in names:
                found.append(f"{where}: from torch import load (weights_only cannot be checked)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            first, dot, rest = name.partition(".")
            name = aliases.get(first, first) + dot + rest  # th.load -> torch.load
            head, _, attr = name.rpartition(".")
            if head.split(".")[-1] in PICKLE_MODULES and attr in PICKLE_LOADS:
                found.append(f"{where}: {name}(")
            elif name in ("torch.load", "torch.serialization.load") and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: {name}( without weights_only=True")
            elif _keyword_is(node, "weights_only", True) is False:
                found.append(f"{where}: {name}( with weights_only not True")
            elif _keyword_is(node, "allow_pickle", False) is False:  # np.load, whatever it is called
                found.append(f"{where}: {name}( with allow_pickle not False")
            elif attr == "read_pickle":
                found.append(f"{where}: {name}(")
    return found


def test_no_module_of_the_package_unpickles():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20  # the walk found the package
    found = [f for m in modules for f in pickle_uses(m.read_text(), str(m.relative_to(PACKAGE.parent)))]
    assert found == []


@pytest.mark.parametrize("bad", [
    "import pickle",
    "import cloudpickle as cp",
    "from ray import cloudpickle",
    "from pickle import loads",
    "x = pickle.load(f)",
    "x = cloudpickle.loads(b)",
    "x = ray.cloudpickle.load(f)",
    "x = torch.load(path)",
    "x = torch.load(path, weights_only=False)",
    "x = torch.load(path, weights_only=flag)",
    "x = np.load(path, allow_pickle=True)",
    "x = numpy.load(path, allow_pickle=ok)",
    "x = pd.read_pickle(path)",
    "from torch import load",
    "import torch as th\nx = th.load(path)",
    "x = torch.serialization.load(path)",
    "from numpy import load\nx = load(path, allow_pickle=True)",
    "x = loader(path, weights_only=False)",
])
def test_the_check_finds_each_pickle_load(bad):
    assert len(pickle_uses(bad)) == 1


@pytest.mark.parametrize("good", [
    "x = torch.load(path, map_location='cpu', weights_only=True)",
    "x = np.load(path)",
    "x = np.load(path, allow_pickle=False)",
    "x = safetensors.torch.load_file(path)",
    "x = json.load(f)",
    "model.load_state_dict(state, strict=True)",
    "from safetensors.torch import load",
])
def test_the_check_accepts_safe_loads(good):
    assert pickle_uses(good) == []
