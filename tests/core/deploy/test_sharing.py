"""A saved pruned directory loads anywhere: remote code without clip-prune, Auto classes, processor, pipeline."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, tiny_vision_inputs
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    pipeline,
)

from clip_prune.core.run.finish import export_pruned
from clip_prune.towers import load_model, tower_of

IMAGE_SIZE = 30  # tests/conftest.py's tiny checkpoints

# Runs in a fresh interpreter where `import clip_prune` fails (the venv's editable install included):
# loads DIR with stock transformers and remote code, and saves what it computes on PIXELS.
NO_CLIP_PRUNE = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "clip_prune":
            raise ModuleNotFoundError("clip_prune is blocked in this test")
sys.meta_path.insert(0, _Refuse())
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor
directory, inputs_file, output_file = sys.argv[1:]
model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
inputs = torch.load(inputs_file)
with torch.no_grad():
    tower = model.vision_model if hasattr(model, "vision_model") else model
    outputs = {"pooler_output": tower(**inputs).pooler_output}
processed = {name: loader.from_pretrained(directory)(images=[Image.new("RGB", (40, 50), (200, 30, 30))],
                                                     return_tensors="pt")["pixel_values"]
             for name, loader in (("processor", AutoProcessor), ("image_processor", AutoImageProcessor))}
torch.save({"outputs": outputs, "processed": processed, "class_module": type(model).__module__,
            "clip_prune_imported": any(name.startswith("clip_prune") for name in sys.modules)}, output_file)
"""


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a Python file imports ("" for a relative import)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("" if node.level else node.module.partition(".")[0])
    return names


def head_and_neuron_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Uneven widths, one layer without heads and one without neurons."""
    head_mask = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 0], [0.5, 1, 0, 2]])
    neuron_mask = (torch.arange(37) % 3 != 1).float().repeat(3, 1)
    neuron_mask[2] = 0
    return head_mask, neuron_mask


def save(pretrained: Path, directory: Path) -> torch.nn.Module:
    dense = load_model(str(pretrained)).eval()
    pruned, _ = export_pruned(dense, *head_and_neuron_masks(), directory, str(pretrained),
                                  tiny_vision_inputs(dense, seed=0), latency_repeats=1)
    return pruned


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("pruned") / "pruned"
    return directory, save(tiny_model_dir, directory)


def processed_shape(directory: Path) -> tuple[int, ...]:
    """The shape of the pixel values the directory's own image processor makes of one image."""
    image = Image.new("RGB", (40, 50), (200, 30, 30))
    processor = AutoImageProcessor.from_pretrained(directory)
    return tuple(processor(images=[image], return_tensors="pt")["pixel_values"].shape)


def test_directory_loads_with_remote_code_where_clip_prune_cannot_be_imported(saved, tmp_path) -> None:
    directory, pruned = saved
    inputs = tiny_vision_inputs(pruned, batch=3)
    torch.save(inputs, tmp_path / "pixels.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-I", "-c", NO_CLIP_PRUNE, str(directory), str(tmp_path / "pixels.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert not out["clip_prune_imported"]
    assert out["class_module"].startswith("transformers_modules.")
    with torch.no_grad():
        expected = tower_of(pruned).vision(**inputs).pooler_output
    torch.testing.assert_close(out["outputs"]["pooler_output"], expected, rtol=0, atol=1e-6)
    for name in ("processor", "image_processor"):
        assert tuple(out["processed"][name].shape) == processed_shape(directory), name


def test_directory_names_its_code_in_auto_map(saved) -> None:
    directory, pruned = saved
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    module, _, name = auto_map["AutoModel"].partition(".")
    assert name == type(pruned).__name__
    files = {path.name for path in directory.glob("*.py")}
    assert files == {f"{module}.py", f"{auto_map['AutoConfig'].partition('.')[0]}.py", "pruned_layers.py"}
    for file in files:
        assert imported_packages(directory / file) <= {"torch", "transformers", "huggingface_hub", "typing", ""}
    assert ("AutoModelForZeroShotImageClassification" in auto_map) == tower_of(pruned).has_text


def test_with_clip_prune_imported_the_directory_loads_without_remote_code(saved) -> None:
    directory, pruned = saved
    loaded = AutoModel.from_pretrained(directory)
    assert type(loaded) is type(pruned) and type(loaded) in tower_of(pruned).pruned_classes.values()
    processor = AutoProcessor.from_pretrained(directory)
    image = Image.new("RGB", (40, 50), (200, 30, 30))
    processed = processor(images=[image], return_tensors="pt")
    assert tuple(processed["pixel_values"].shape) == processed_shape(directory)
    if tower_of(pruned).has_text:  # the processor is the family's, with its tokenizer
        assert type(AutoModelForZeroShotImageClassification.from_pretrained(directory)) is type(pruned)
        assert type(processor) is tower_of(pruned).processor_class
        assert processor(text=["a red square"], return_tensors="pt")["input_ids"].shape[0] == 1
    with torch.no_grad():
        torch.testing.assert_close(tower_of(loaded.eval()).image_embeds(processed),
                                   tower_of(pruned).image_embeds(processed), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zero_shot_pipeline_gives_the_scores_of_the_pruned_model_by_hand(family, tmp_path) -> None:
    """CLIP's softmax over the labels; SigLIP's sigmoid of each pair (captions padded to 64, as the pipeline does)."""
    directory = tmp_path / "pruned"
    pruned = save(save_tiny_model(tmp_path / "dense", family), directory)
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(directory)) is type(pruned)
    labels, template = ["red square", "blue circle", "large green square"], "a {}"
    image = Image.new("RGB", (40, 40), (220, 30, 30))
    classifier = pipeline("zero-shot-image-classification", model=str(directory))
    scores = {entry["label"]: entry["score"]
              for entry in classifier(image, candidate_labels=labels, hypothesis_template=template)}
    processor = AutoProcessor.from_pretrained(directory)
    padding = {"padding": True} if family == "clip" else {"padding": "max_length", "max_length": 64}
    inputs = processor(text=[template.format(label) for label in labels], images=[image], return_tensors="pt",
                       **padding)
    with torch.no_grad():
        logits = pruned(**inputs).logits_per_image[0]
    by_hand = logits.softmax(dim=-1) if family == "clip" else logits.sigmoid()
    assert [scores[label] for label in labels] == pytest.approx(by_hand.tolist(), abs=1e-6)


# Runs in a fresh interpreter: what `import clip_prune` alone lets transformers do with DIR.
ONLY_IMPORTED = """
import sys
import clip_prune
from transformers import AutoConfig, AutoModel
heavy = "transformers.modeling_utils" in sys.modules
loaded = AutoModel.from_pretrained(sys.argv[1])
built = AutoModel.from_config(AutoConfig.from_pretrained(sys.argv[1]))
print(heavy, type(loaded).__module__, type(loaded).__name__, type(built) is type(loaded),
      AutoModel._model_mapping[type(loaded.config)] is type(loaded))
"""


def test_import_registers_the_directory_without_modeling_code_and_loads_the_real_class(saved) -> None:
    """`import clip_prune` registers stand-ins (clip_prune/registration.py); the first load puts the class in."""
    directory, pruned = saved
    result = subprocess.run([sys.executable, "-c", ONLY_IMPORTED, str(directory)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    heavy, module, name, built_alike, registered = result.stdout.split()
    assert heavy == "False", "import clip_prune imported transformers.modeling_utils"
    assert (module, name) == (type(pruned).__module__, type(pruned).__name__)
    assert built_alike == registered == "True"
