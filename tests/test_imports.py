"""The architecture's layers: the pure core (towers, core, data, hub) imports neither Lightning nor the glue."""

import ast
import re
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
    """No reference to a design document outside the repository; every cited section of docs/*.md exists."""
    root = PACKAGE.parents[1]
    sections = {path.stem: set(re.findall(r"^##+ (.+)$", path.read_text(), re.M))
                for path in (root / "docs").glob("*.md")}
    files = [path for folder in ("src", "tests", "benchmarks", "configs") for path in (root / folder).rglob("*")]
    for path in files:
        if path.suffix not in (".py", ".yaml") or path == Path(__file__):
            continue
        text = " ".join(path.read_text().split())  # a citation may wrap across lines
        assert "DESIGN.md" not in text, path
        for document, cited in re.findall(r'docs/(\w+)\.md,? \(?"([^"]+)"', text):
            assert cited in sections.get(document, ()), \
                f"{path.relative_to(root)} cites a missing section {cited!r} of docs/{document}.md"


def test_loading_a_pruned_model_imports_no_lightning_and_no_torchmetrics() -> None:
    """`import clip_prune` (the registration a user needs to load a pruned model) costs no more than the model classes
    it registers: the Fisher pass's torchmetrics (which drags in torch._dynamo) and Lightning stay out."""
    code = ("import sys, clip_prune; from clip_prune.core.deploy.saving import load_pruned; "
            "print(sorted(name for name in ('lightning', 'torchmetrics') if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_rooms_of_core_point_down() -> None:
    """core/pruning (tensors in, tensors out) imports neither deploy/ nor run/; deploy/ (slice, save, share) does not
    import run/ (one run's measuring and reporting); the shared floor (timing, file names) imports no room."""
    rooms = {"pruning": ("clip_prune.core.deploy", "clip_prune.core.run"), "deploy": ("clip_prune.core.run",)}
    for room, forbidden in rooms.items():
        for path in (PACKAGE / "core" / room).rglob("*.py"):
            wrong = {name for name in _imports(path) if name.startswith(forbidden)}
            assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}"
    for floor in ("timing.py", "file_names.py"):
        wrong = {name for name in _imports(PACKAGE / "core" / floor) if name.startswith("clip_prune.core")}
        assert not wrong, f"core/{floor} imports {sorted(wrong)}"


TRANSFORMERS_MODULES = {"self_attn", "out_proj", "q_proj", "k_proj", "v_proj", "mlp", "fc1", "fc2", "layer_norm1",
                        "layer_norm2", "activation_fn", "encoder", "embeddings", "post_layernorm", "vision_model",
                        "text_model"}
"""Attributes of the modules inside transformers' CLIP-family models."""
TRANSFORMERS_PATHS = re.compile(r"\b(self_attn|out_proj|[qkv]_proj|fc1|fc2|layer_norm[12]|post_layernorm)\b")
"""Those names as they appear in module paths and state-dict keys."""


def _names_transformers(kind: str, text: str) -> bool:
    return text in TRANSFORMERS_MODULES if kind == "attribute" else bool(TRANSFORMERS_PATHS.search(text))


def _code_strings_and_attributes(path: Path) -> list[tuple[int, str, str]]:
    """(line, kind, text) of every attribute access and every string that is not a docstring in `path`."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = [(node.lineno, "attribute", node.attr) for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    found += [(node.lineno, "string", node.value) for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]
    return found


def test_core_names_no_transformers_module() -> None:
    """core/ reaches the modules of an encoder layer only through the family's tower (`VisionTower.part`), so a family
    whose modules are named otherwise is one adapter file in towers/."""
    offending = [f"{path.relative_to(PACKAGE)}:{line}: {text!r}"
                 for path in sorted((PACKAGE / "core").rglob("*.py"))
                 for line, kind, text in _code_strings_and_attributes(path) if _names_transformers(kind, text)]
    assert not offending, "\n".join(offending)


def test_the_check_of_transformers_names_finds_them(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text('"""Mentions out_proj in prose."""\nx = layer.self_attn\ny = "layers.0.mlp.fc2"\nz = "mlp"\n')
    assert [text for _, kind, text in _code_strings_and_attributes(source) if _names_transformers(kind, text)] == [
        "self_attn", "layers.0.mlp.fc2"]


def _module_file(parts: list[str]) -> Path | None:
    base = PACKAGE.parent.joinpath(*parts)
    return next((file for file in (base.with_suffix(".py"), base / "__init__.py") if file.is_file()), None)


def _resolves(parts: list[str]) -> bool:
    """Whether `a.b.c` is a module, or a name a module defines."""
    if _module_file(parts) is not None:
        return True
    module = _module_file(parts[:-1])
    return module is not None and re.search(rf"\b{parts[-1]}\b", module.read_text()) is not None


def test_no_reference_points_at_a_missing_module() -> None:
    """Every `clip_prune.x.y` name and every `core/…/x.py`-style path the sources mention exists."""
    root = PACKAGE.parents[1]
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for dotted in re.findall(r"\bclip_prune(?:\.\w+)+", text):
            assert _resolves(dotted.split(".")), f"{path.relative_to(PACKAGE)} names {dotted}, which does not exist"
        for cited in re.findall(r"(?<![\w./-])((?:[a-z_]+/)+[a-z_]+\.py)\b", text):
            candidates = [root / cited, PACKAGE / cited, PACKAGE.parent / cited, root / "benchmarks" / cited]
            assert any(candidate.is_file() for candidate in candidates), \
                f"{path.relative_to(PACKAGE)} cites {cited}, which does not exist"
