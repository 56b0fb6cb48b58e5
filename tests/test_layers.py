"""The layers of the code: each module imports only from its own layer or the ones below, and no two
packages of a layer import each other. Read from the source (ast), so lazy imports inside functions
count too; an import under `if TYPE_CHECKING:` is a type only and is left out."""

import ast
import functools
from pathlib import Path

from tests.helpers import ROOT, imports, modules, source_tree

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
    ("leakpipe.pipeline.ledger",),  # bookkeeping, below the math it records: it builds and runs no model
    ("leakpipe.pipeline.bench",),
    ("leakpipe.pipeline.engine",),
    ("leakpipe.pipeline.report",),
    ("leakpipe.stages",),
    ("leakpipe.workflows",),
    ("leakpipe.pipeline.cli_base",),
    (
        "leakpipe.pipeline.cli",
        "leakpipe.pipeline.cli_data",
        "leakpipe.pipeline.cli_ledger",
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


def test_every_module_has_a_layer_and_every_layer_entry_is_a_module():
    assert [m for m in modules() if part(m) is None] == []
    assert [p for layer in LAYERS for p in layer if not any(m == p or m.startswith(p + ".") for m in modules())] == []


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


HEAVY = (
    "torch",
    "diffusers",
    "zarr",
    "sklearn",
    "skimage",
    "scipy",
    "matplotlib",
    "gradio",
    "dask",
    "distributed",
    "s3fs",
    "tensorboard",
    "huggingface_hub",
    "PIL",
)  # each costs start-up time a light command must not pay
OPTIONAL = ("leakpipe.pipeline.engine.tboard", "leakpipe.workflows.app")  # behind an extra (tensorboard, gradio)
START_UP = ("leakpipe.pipeline.cli",)  # every command starts here: each imports what it runs


def _top_level(path: Path) -> list[str]:
    """What a module imports when it is imported (its module-level imports, names included)."""
    out = []
    for node in source_tree(path).body:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return out


@functools.cache
def heavy(module: str, seen: frozenset = frozenset()) -> bool:
    """Whether importing `module` imports one of HEAVY (through leakpipe's module-level imports)."""
    if module.split(".")[0] in HEAVY:
        return True
    path = modules().get(module)
    if path is None or module in seen:
        return False
    return any(heavy(m, seen | {module}) for m in _top_level(path) if m.split(".")[0] in HEAVY or m in modules())


def test_imports_sit_at_the_top_unless_heavy():
    """An import of a leakpipe module inside a function is there for start-up time: the module it
    imports is heavy (torch, zarr, PIL ...), behind an optional extra, or the importer is the CLI,
    where each command imports what it runs. Everything else goes at the top of the module."""
    lazy = []
    for name, path in modules().items():
        if name.startswith(START_UP):
            continue
        for fn in ast.walk(source_tree(path)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leakpipe."):
                    targets = [
                        f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules() else node.module
                        for a in node.names
                    ]
                    if not any(heavy(t) or t.startswith(OPTIONAL) for t in targets):
                        lazy.append(
                            f"{path.relative_to(ROOT)}:{node.lineno} {node.module} {[a.name for a in node.names]}"
                        )
    assert lazy == [], "\n".join(lazy)
