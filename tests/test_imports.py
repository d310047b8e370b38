"""The architecture's layers: the pure core (towers, core, data, hub) imports neither Lightning nor the glue."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clip_prune"
CORE_PACKAGES = ("towers", "core", "data", "hub")


def test_core_runs_without_lightning() -> None:
    modules = [f"clip_prune.{path.relative_to(PACKAGE.parent).with_suffix('').as_posix().split('/', 1)[1]}"
               .replace("/", ".").removesuffix(".__init__")
               for package in CORE_PACKAGES for path in sorted((PACKAGE / package).rglob("*.py"))]
    glue = "m == 'lightning' or m.startswith(('lightning.', 'clip_prune.lightning'))"
    script = "import sys, importlib\n" + "".join(f"importlib.import_module({name!r})\n" for name in modules) + (
        f"print(sorted(m for m in sys.modules if {glue}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"the core imported {result.stdout.strip()}"
    assert len(modules) > 25


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_arrows_point_down() -> None:
    """towers/ and hub/ import no other clip_prune layer above them; core/ and data/ never import the glue;
    files.py (atomic directories) and errors.py, below it, are below them all."""
    allowed = {"hub": ("clip_prune.hub",), "towers": ("clip_prune.towers", "clip_prune.hub", "clip_prune.errors"),
               "data": ("clip_prune.data", "clip_prune.files", "clip_prune.errors"),
               "core": ("clip_prune.core", "clip_prune.towers", "clip_prune.hub", "clip_prune.data",
                        "clip_prune.files", "clip_prune.errors")}
    assert not {name for name in _imports(PACKAGE / "errors.py") if name.startswith("clip_prune")}, \
        "errors.py is the bottom layer: it imports nothing of clip_prune"
    files_imports = {name for name in _imports(PACKAGE / "files.py") if name.startswith("clip_prune")}
    assert files_imports <= {"clip_prune.errors"}, "files.py imports nothing of clip_prune but errors.py, below it"
    for package, prefixes in allowed.items():
        for path in (PACKAGE / package).rglob("*.py"):
            ours = {name for name in _imports(path) if name.startswith("clip_prune")}
            wrong = {name for name in ours if not name.startswith(prefixes)}
            assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}"


def test_the_code_cites_only_documents_users_have() -> None:
    """No reference to a design document outside the repository; every cited section of docs/design.md exists."""
    import re

    sections = set(re.findall(r"^## (.+)$", (PACKAGE.parents[1] / "docs" / "design.md").read_text(), re.M))
    for path in PACKAGE.rglob("*"):
        if path.suffix not in (".py", ".yaml"):
            continue
        text = " ".join(path.read_text().split())  # a citation may wrap across lines
        assert "DESIGN.md" not in text, path
        for cited in re.findall(r'docs/design\.md,? \(?"([^"]+)"', text):
            assert cited in sections, f"{path.relative_to(PACKAGE)} cites a missing section {cited!r}"


def test_loading_a_pruned_model_imports_no_lightning_and_no_torchmetrics() -> None:
    """`import clip_prune` (the registration a user needs to load a pruned model) costs no more than the model classes
    it registers: the Fisher pass's torchmetrics (which drags in torch._dynamo) and Lightning stay out."""
    code = ("import sys, clip_prune; from clip_prune.core.deploy.saving import load_pruned; "
            "print(sorted(name for name in ('lightning', 'torchmetrics') if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
