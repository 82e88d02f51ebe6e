"""The library's layers import one way, bottom to top (docs/architecture.md): a module
imports its own layer and the layers below it, never one above. So the kernel contract
needs no validation, no kernel imports the oracle (the reference sits above the kernels),
and only the apps import everything."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "jax_attn"

# Bottom to top; a name covers the module and, ending in ".*", everything below it.
LAYERS = (
    ("foundations", ("jax_attn.shapes", "jax_attn.data", "jax_attn.data.*")),
    ("masks", ("jax_attn.masks", "jax_attn.mask_functions")),
    ("kernel contract", ("jax_attn.kernels.contract",)),
    ("validation", ("jax_attn.validation",)),
    ("kernels", ("jax_attn.kernels", "jax_attn.kernels.*")),
    ("functional core and oracle", ("jax_attn.functional", "jax_attn.reference")),
    ("dispatch", ("jax_attn.dispatch",)),
    ("decoding", ("jax_attn.kv_cache",)),
    (
        "modules",
        (
            "jax_attn.module_spec",
            "jax_attn.linen_modules",
            "jax_attn.nnx_modules",
            "jax_attn.flax_attention",
        ),
    ),
    ("interop and scale-out", ("jax_attn.interop", "jax_attn.sharding")),
    ("package", ("jax_attn",)),
    # `python -m jax_attn` is the command line: it belongs with the apps
    ("apps", ("jax_attn.apps", "jax_attn.apps.*", "jax_attn.__main__")),
)


def layer_of(module: str) -> int | None:
    """Index in LAYERS of ``module``, the most specific name winning."""
    best, best_length = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            prefix = name[:-2] if name.endswith(".*") else None
            covers = module.startswith(prefix + ".") if prefix else module == name
            if covers and len(name) > best_length:
                best, best_length = index, len(name)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def runtime_imports(path: Path, known: set[str]) -> set[str]:
    """The ``jax_attn`` modules ``path`` imports when it runs, at any depth (lazy imports
    in functions too), leaving out ``if TYPE_CHECKING:`` blocks (annotations only)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            for child in node.orelse:  # type: ignore[attr-defined]
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {name for name in found if name == "jax_attn" or name.startswith("jax_attn.")}


def _library_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    modules = [module_name(path) for path in _library_files()]
    assert len(modules) > 30
    assert [name for name in modules if layer_of(name) is None] == []


def test_imports_go_down_the_layers_only():
    known = {module_name(path) for path in _library_files()}
    upward = []
    for path in _library_files():
        importer = module_name(path)
        own = layer_of(importer)
        assert own is not None
        for imported in sorted(runtime_imports(path, known)):
            layer = layer_of(imported)
            if layer is not None and layer > own:
                upward.append(f"{importer} ({LAYERS[own][0]}) -> {imported} ({LAYERS[layer][0]})")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    # A kernel importing the oracle is the import this test exists to refuse.
    kernel = tmp_path / "kernel.py"
    kernel.write_text("from jax_attn.reference import reference_attention\n")
    imported = runtime_imports(kernel, {"jax_attn.reference"})
    assert imported == {"jax_attn.reference"}
    assert layer_of("jax_attn.reference") > layer_of("jax_attn.kernels.xla")
    assert layer_of("jax_attn.kernels.contract") < layer_of("jax_attn.validation")
