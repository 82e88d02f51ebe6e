"""The library stands without the apps: no import of ``jax_attn.apps`` from outside it, and
``import jax_attn`` (with every library layer) loads nothing beyond jax and flax."""

import ast
import json
import sys
from pathlib import Path

import pytest
from processes import run_python

from jax_attn.apps import extras

PACKAGE = Path(__file__).resolve().parents[2] / "jax_attn"
APP_ONLY = ("optax", "matplotlib", "tqdm", "torch", "orbax", "hypothesis")
LIBRARY_IMPORT = (
    "import jax_attn, jax_attn.linen_modules, jax_attn.nnx_modules, jax_attn.kv_cache, "
    "jax_attn.sharding, jax_attn.interop"
)
# What jax and flax load by themselves (flax.nnx brings optax, say) is theirs, not ours.
DEPENDENCIES_IMPORT = "import jax, flax.linen, flax.nnx"


def modules_loaded_by(statement: str, after: str) -> set[str]:
    """Modules that ``statement`` adds to ``sys.modules`` in a fresh interpreter
    that has run ``after`` first."""
    code = (
        f"{after}; import sys, json; before = set(sys.modules); {statement}; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_importing_the_library_loads_no_app_dependency():
    loaded = modules_loaded_by(LIBRARY_IMPORT, after=DEPENDENCIES_IMPORT)
    assert "jax_attn.nnx_modules" in loaded
    top_level = {name.split(".")[0] for name in loaded}
    assert sorted(top_level & set(APP_ONLY)) == []
    assert sorted(name for name in loaded if name.startswith("jax_attn.apps")) == []


def test_nothing_outside_apps_imports_the_apps():
    library_files = [
        path
        for path in PACKAGE.rglob("*.py")
        if "apps" not in path.relative_to(PACKAGE).parts and path.name != "__main__.py"
    ]
    assert len(library_files) > 10
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in imported_modules(path) if name.startswith("jax_attn.apps")
        )
        for path in library_files
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_plots_does_not_depend_on_train():
    imports = imported_modules(PACKAGE / "apps" / "plots.py")
    assert not {name for name in imports if "train" in name or name in ("optax", "tqdm")}


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "optax", None)  # what an uninstalled module looks like
    with pytest.raises(extras.MissingExtra, match=r'optax.*pip install "jax_attn\[apps\]"'):
        extras.require("optax")


def test_a_command_without_its_extra_exits_2_naming_it(monkeypatch, capsys):
    from jax_attn.apps import cli

    monkeypatch.setitem(sys.modules, "optax", None)
    monkeypatch.delitem(sys.modules, "jax_attn.apps.train", raising=False)
    assert cli.main(["train", "--help"]) == 2
    assert "jax-attn train: this command needs optax" in capsys.readouterr().err


def test_dir_lists_the_lazy_layers_before_they_load():
    # a fresh interpreter: in this one some other test may have loaded the layers already
    code = (
        "import json, sys, jax_attn; "
        "print(json.dumps([dir(jax_attn), jax_attn.__all__, sorted(sys.modules)]))"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    listed, exported, loaded = json.loads(done.stdout.splitlines()[-1])
    lazy = {"interop", "sharding", "kv_cache", "nnx_modules", "kernels", "dispatch"}
    assert lazy <= set(listed)
    assert not {f"jax_attn.{name}" for name in ("interop", "sharding", "nnx_modules")} & set(loaded)
    assert set(exported) <= set(listed)
    assert listed == sorted(listed) and "__version__" in listed

    import jax_attn

    assert [name for name in listed if not hasattr(jax_attn, name)] == []


def test_core_tests_use_neither_the_apps_nor_kernel_privates():
    """tests/core tests the library through its public names: no ``jax_attn.apps`` import,
    no ``_private`` name of a kernel module (kernel internals are tested in tests/kernels)."""
    core_tests = sorted((PACKAGE.parent / "tests" / "core").glob("*.py"))
    assert len(core_tests) > 5
    offenders = {}
    for path in core_tests:
        tree = ast.parse(path.read_text(), str(path))
        kernel_modules = set()  # local names bound to jax_attn.kernels modules
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("jax_attn.apps") or any(
                    alias.name == "apps" for alias in node.names if node.module == "jax_attn"
                ):
                    found.append(node.module)
                if node.module.startswith("jax_attn.kernels"):
                    found += [a.name for a in node.names if a.name.startswith("_")]
                    kernel_modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                found += [a.name for a in node.names if a.name.startswith("jax_attn.apps")]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in kernel_modules
            ):
                found.append(f"{node.value.id}.{node.attr}")
        if found:
            offenders[path.name] = sorted(set(found))
    assert offenders == {}
