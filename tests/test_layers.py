"""The package's layers, read from its source: the core never imports the shapes world (a
client like any user), no module imports its way back to itself or takes another's private
names, and the public names import from the top."""

import ast
from pathlib import Path

import zimagekit

ROOT = Path(zimagekit.__file__).parent
# Clients of the core: the command line, the server and the shapes world.
CLIENTS = ("zimagekit.cli", "zimagekit.__main__", "zimagekit.shapes", "zimagekit.serve")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every zimagekit module ``path`` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            # "from . import world" imports a module, not a name
            found |= {f"{base}.{a.name}" for a in node.names}
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


GRAPH = {module_name(p): imports(p) for p in ROOT.rglob("*.py")}


def test_the_core_never_imports_the_shapes_world():
    core = {m: deps for m, deps in GRAPH.items() if not m.startswith(CLIENTS)}
    assert "zimagekit.s3dit" in core and "zimagekit.algorithms.decoupled_dmd" in core
    leaks = {m: sorted(d for d in deps if d.startswith("zimagekit.shapes")) for m, deps in core.items()}
    assert not {m: d for m, d in leaks.items() if d}


def test_no_module_imports_another_modules_private_names():
    private = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__" and (node.level or (
                    node.module or "").startswith("zimagekit")):
                private += [f"{module_name(path)}: {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.endswith("__")]  # __version__ is public
    assert not private


def test_no_module_imports_its_way_back_to_itself():
    def reaches(start, target, seen):
        for dep in GRAPH.get(start, ()):
            if dep == target or (dep not in seen and not seen.add(dep) and reaches(dep, target, seen)):
                return True
        return False

    cycles = sorted(m for m in GRAPH if reaches(m, m, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_public_names_import_from_the_top_without_loading_torch_first():
    import subprocess
    import sys

    code = ("import sys, zimagekit; assert 'torch' not in sys.modules; "
            "from zimagekit import ZImagePipeline, S3DiT, S3DiTConfig, LoRA; "
            "from zimagekit.pipeline import ZImagePipeline as P; from zimagekit.s3dit import S3DiT as M; "
            "from zimagekit.lora import LoRA as L; assert (ZImagePipeline, S3DiT, LoRA) == (P, M, L); "
            "assert sorted(zimagekit.__all__) == ['LoRA', 'S3DiT', 'S3DiTConfig', 'ZImagePipeline']")
    subprocess.run([sys.executable, "-c", code], check=True)
