"""The layers of the code: each module imports only from its own layer or the ones below, and no two
packages of a layer import each other. Read from the source (ast), so lazy imports inside functions
count too; an import under `if TYPE_CHECKING:` is a type only and is left out."""

import ast
from pathlib import Path

import leakpipe.pipeline

ROOT = Path(leakpipe.pipeline.__file__).parent.parent  # the checkout: pipeline/, stages/, workflows/
# lowest first: math, nn and store know nothing of leakpipe's config; the CLI sits on everything
LAYERS = [
    (
        "leakpipe.pipeline.errors",
        "leakpipe.pipeline.names",
        "leakpipe.pipeline.progress",
        "leakpipe.pipeline.math",
        "leakpipe.pipeline.nn",
        "leakpipe.pipeline.store",
    ),
    (
        "leakpipe.pipeline.config",
        "leakpipe.pipeline.config_files",
        "leakpipe.pipeline.manifest",
        "leakpipe.pipeline.manifest_columns",
        "leakpipe.pipeline.workspace",
    ),
    ("leakpipe.pipeline.bench",),
    ("leakpipe.pipeline.engine",),
    ("leakpipe.pipeline.report",),
    ("leakpipe.pipeline.ledger",),
    ("leakpipe.stages",),
    ("leakpipe.workflows",),
    ("leakpipe.pipeline.cli_base",),
    (
        "leakpipe.pipeline.cli",
        "leakpipe.pipeline.cli_data",
        "leakpipe.pipeline.cli_ledger",
        "leakpipe.pipeline.cli_app",
    ),
]


def part(module: str) -> tuple[int, str] | None:
    """(layer, the package or module of LAYERS it belongs to) of a leakpipe module."""
    if module == "leakpipe.pipeline":  # its __init__ holds the version only
        return 0, module
    for layer, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return layer, prefix
    return None


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in (
        ("pipeline", "leakpipe.pipeline"),
        ("stages", "leakpipe.stages"),
        ("workflows", "leakpipe.workflows"),
    ):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            name = ".".join((package, *rel.parts))
            out[name.removesuffix(".__init__")] = path
    return out


def _type_only(tree: ast.AST) -> set[int]:
    """Line numbers of the imports under `if TYPE_CHECKING:`."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    skip = _type_only(tree)
    out = []
    for node in ast.walk(tree):
        if node.lineno in skip if hasattr(node, "lineno") else False:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [
                (
                    node.lineno,
                    f"{node.module}.{a.name}"
                    if part(f"{node.module}.{a.name}") and f"{node.module}.{a.name}" in modules()
                    else node.module,
                )
                for a in node.names
            ]
    return [(line, name) for line, name in out if name.startswith("leakpipe.")]


def test_every_module_has_a_layer():
    assert [m for m in modules() if part(m) is None] == []


def test_imports_point_down_and_packages_of_a_layer_do_not_import_each_other():
    down, across = [], {}
    for name, path in modules().items():
        layer, pkg = part(name)
        for line, target in imports(path):
            t = part(target)
            if t is None or t[1] == pkg:
                continue
            if t[0] > layer:
                down.append(f"{path.relative_to(ROOT)}:{line} ({pkg}, layer {layer}) imports {target} (layer {t[0]})")
            elif t[0] == layer:
                across.setdefault((pkg, t[1]), []).append(f"{path.relative_to(ROOT)}:{line}")
    cycles = [f"{a} <-> {b}: {across[(a, b)][0]}, {across[(b, a)][0]}" for a, b in across if (b, a) in across and a < b]
    assert down == [], "\n".join(down)
    assert cycles == [], "\n".join(cycles)


def test_the_light_commands_do_not_import_torch():
    """`status`, `manifest` and a no-op rerun start without torch: the CLI and what status needs import
    it only when a stage works."""
    import subprocess
    import sys

    code = (
        "import sys; import leakpipe.pipeline.cli, leakpipe.stages, leakpipe.workflows.status; "
        "print(sorted(m for m in ('torch', 'diffusers', 'zarr', 'sklearn', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
