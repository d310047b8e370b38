"""Physical pruning: sliced model vs hook-masked model, save/reload, counted vs analytic MACs, errors."""

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_tiny_model, tiny_vision_inputs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
)

import clip_prune
from clip_prune.core.deploy.saving import cut_pruned_model, load_pruned, read_masks, save_pruned
from clip_prune.core.deploy.slicing import (
    LayerPlan,
    masks_from_plan,
    plan_from_masks,
    read_plan,
    slice_vision_tower,
    write_plan,
)
from clip_prune.core.file_names import PLAN_FILE
from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.masks import VisionMasks
from clip_prune.core.run.costs import counted_vision_macs
from clip_prune.files import MANIFEST
from clip_prune.hub.configuration_clip_pruned import PrunedCLIPConfig, PrunedCLIPVisionConfig
from clip_prune.hub.modeling_clip_pruned import PrunedCLIPVisionModel
from clip_prune.hub.pruned_layers import ConstantAttention, ConstantMLP
from clip_prune.towers import tower_of
from clip_prune.towers.clip import ClipTower

LAYERS, HEADS, NEURONS, IMAGE_SIZE = 3, 4, 37, 30
REPO_ROOT = Path(__file__).resolve().parents[3]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "original-tool-masks"
ORIGINAL_MASKS = FIXTURES / "clip-vit-base-patch16" / "mscoco"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One CPU thread: faster for these small models, and a busy machine cannot stall a thread barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vision_config(**overrides: object) -> CLIPVisionConfig:
    """transformers' CLIPVisionModelTester sizes: 30 px, patch 2 (T = 226), width 32, 4 heads, 37 neurons."""
    values = dict(image_size=IMAGE_SIZE, patch_size=2, hidden_size=32, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=NEURONS)
    return CLIPVisionConfig(**{**values, **overrides})


def clip_config() -> CLIPConfig:
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=16, bos_token_id=0, pad_token_id=1,
                eos_token_id=2)
    return CLIPConfig(text_config=text, vision_config=vision_config().to_dict(), projection_dim=24)


def build(kind: str, attn: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """`clip` and `vision` at transformers' tester sizes; the other families (`FAMILIES`) at conftest's."""
    torch.manual_seed(seed)
    if kind == "clip":
        return CLIPModel._from_config(clip_config(), attn_implementation=attn).eval()
    if kind == "vision":
        return CLIPVisionModel._from_config(vision_config(), attn_implementation=attn).eval()
    return build_tiny_model(kind, seed, attn)


def inputs_of(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random inputs of the model's vision tower (SigLIP2's with a padded image)."""
    return tiny_vision_inputs(model, batch, seed)


def masks(kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 0/1 or rescaled masks; "no_heads"/"no_neurons" also empty layer 1's heads/neurons."""
    generator = torch.Generator().manual_seed(seed)
    head_mask = (torch.rand(LAYERS, HEADS, generator=generator) < 0.6).float()
    neuron_mask = (torch.rand(LAYERS, NEURONS, generator=generator) < 0.6).float()
    head_mask[:, 0] = neuron_mask[:, 0] = 1  # no accidental empty layers
    if kind != "binary":
        head_mask *= torch.randn(LAYERS, HEADS, generator=generator) * 2
        neuron_mask *= torch.randn(LAYERS, NEURONS, generator=generator) * 2
    if kind in ("no_heads", "both_empty"):
        head_mask[1] = 0
    if kind in ("no_neurons", "both_empty"):
        neuron_mask[1 if kind == "both_empty" else 2] = 0
    return head_mask, neuron_mask


def pixels(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def image_outputs(model: torch.nn.Module, pixel_values: torch.Tensor | dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Last hidden state and pooled output of the vision tower, plus image embeddings for a full model."""
    inputs = {"pixel_values": pixel_values} if isinstance(pixel_values, torch.Tensor) else pixel_values
    tower = tower_of(model).vision(**inputs)
    outputs = {"last_hidden_state": tower.last_hidden_state, "pooler_output": tower.pooler_output}
    if tower_of(model).has_text:
        outputs["image_embeds"] = model.get_image_features(**inputs).pooler_output
    return outputs


def masked_outputs(model: torch.nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                   pixel_values: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference: the dense model with the masks applied by forward pre-hooks."""
    hooks = VisionMasks(model, head_mask, neuron_mask)
    try:
        return image_outputs(model, pixel_values)
    finally:
        hooks.remove()


def assert_outputs_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                         atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        error = (actual[name] - expected[name]).abs().max().item()
        assert error <= atol, f"{name}: max abs error {error:.3g} > {atol}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mask_kind", ["binary", "rescaled", "no_heads", "no_neurons", "both_empty"])
@pytest.mark.parametrize("model_kind", ["vision", "clip", *FAMILIES[2:], "siglip2_vision"])
def test_pruned_model_matches_masked_model(model_kind: str, mask_kind: str, attn: str) -> None:
    model = build(model_kind, attn)
    head_mask, neuron_mask = masks(mask_kind)
    x = inputs_of(model)
    expected = masked_outputs(model, head_mask, neuron_mask, x)
    dense = image_outputs(model, x)
    pruned = cut_pruned_model(model, head_mask, neuron_mask)

    assert type(pruned) is tower_of(model).pruned_classes[model.config.model_type]
    assert pruned.config._attn_implementation == attn
    assert not pruned.training
    assert_outputs_close(image_outputs(pruned, x), expected, atol=1e-5)
    # the masks change the output, so the comparison above can fail; and model is left dense
    assert (dense["last_hidden_state"] - expected["last_hidden_state"]).abs().max() > 1e-3
    assert_outputs_close(image_outputs(model, x), dense, atol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_slice_vision_tower_in_place(attn: str) -> None:
    model = build("vision", attn)
    head_mask, neuron_mask = masks("both_empty")
    x = pixels()
    expected = masked_outputs(model, head_mask, neuron_mask, x)
    assert slice_vision_tower(model, head_mask, neuron_mask) is model
    assert_outputs_close(image_outputs(model, x), expected, atol=1e-5)

    head_dim = 32 // HEADS
    for layer, heads, neurons in zip(model.encoder.layers, head_mask, neuron_mask, strict=True):
        kept_heads, kept_neurons = int((heads != 0).sum()), int((neurons != 0).sum())
        if kept_heads:
            assert layer.self_attn.num_heads == kept_heads
            assert layer.self_attn.q_proj.weight.shape == (kept_heads * head_dim, 32)
            assert layer.self_attn.out_proj.weight.shape == (32, kept_heads * head_dim)
        else:
            assert isinstance(layer.self_attn, ConstantAttention)
        if kept_neurons:
            assert layer.mlp.fc1.weight.shape == (kept_neurons, 32)
            assert layer.mlp.fc2.weight.shape == (32, kept_neurons)
        else:
            assert isinstance(layer.mlp, ConstantMLP)
    keys = set(model.state_dict())
    assert "encoder.layers.1.self_attn.out_proj.bias" in keys
    assert "encoder.layers.1.mlp.fc2.bias" in keys
    assert "encoder.layers.1.self_attn.q_proj.weight" not in keys


def test_plan_from_masks_and_json_round_trip(tmp_path: Path) -> None:
    head_mask, neuron_mask = masks("no_heads")
    plan = plan_from_masks(head_mask, neuron_mask)
    assert len(plan) == LAYERS
    assert plan[1].heads == [] and plan[1].head_scales == []
    for layer, heads, neurons in zip(plan, head_mask, neuron_mask, strict=True):
        assert layer.heads == torch.nonzero(heads).flatten().tolist()
        assert layer.neurons == torch.nonzero(neurons).flatten().tolist()
    write_plan(plan, tmp_path / PLAN_FILE)
    assert read_plan(tmp_path / PLAN_FILE) == plan
    rebuilt_heads, rebuilt_neurons = masks_from_plan(plan, HEADS, NEURONS)
    assert torch.equal(rebuilt_heads, head_mask) and torch.equal(rebuilt_neurons, neuron_mask)


@pytest.mark.parametrize("model_kind", ["vision", "clip", *FAMILIES[2:]])
def test_save_and_reload(model_kind: str, tmp_path: Path) -> None:
    model = build(model_kind)
    head_mask, neuron_mask = masks("both_empty")
    pruned = cut_pruned_model(model, head_mask, neuron_mask)
    plan = plan_from_masks(head_mask, neuron_mask)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    output = save_pruned(pruned, tmp_path / "out" / "pruned", plan, processor=processor)

    files = {path.name for path in output.iterdir()}
    family = "clip" if tower_of(model).family == "clip" else "siglip"  # SigLIP2's classes live in SigLIP's files
    assert files == {"config.json", "model.safetensors", PLAN_FILE, "preprocessor_config.json",
                     f"configuration_{family}_pruned.py", f"modeling_{family}_pruned.py", "pruned_layers.py", MANIFEST}
    assert [path.name for path in tmp_path.joinpath("out").iterdir()] == ["pruned"], "staging dir left behind"
    assert read_plan(output / PLAN_FILE) == plan
    assert CLIPImageProcessor.from_pretrained(output).crop_size == processor.crop_size

    x = inputs_of(model)
    expected = image_outputs(pruned, x)
    loaded, info = AutoModel.from_pretrained(output, output_loading_info=True)
    assert type(loaded) is type(pruned)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_outputs_close(image_outputs(loaded, x), expected, atol=0)
    eager = load_pruned(output, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert_outputs_close(image_outputs(eager, x), expected, atol=1e-5)
    assert tower_of(loaded).vision.config.heads_per_layer == [len(layer.heads) for layer in plan]

    if tower_of(model).has_text:
        # The text tower, projections, logit scale (and SigLIP's bias) come back untouched.
        dense_rest = {key: value for key, value in model.state_dict().items() if not key.startswith("vision_model.")}
        loaded_rest = {key: value for key, value in loaded.state_dict().items() if not key.startswith("vision_model.")}
        assert type(loaded.text_model) is type(model.text_model)
        assert dense_rest.keys() == loaded_rest.keys() and "logit_scale" in dense_rest
        assert all(torch.equal(dense_rest[key], loaded_rest[key]) for key in dense_rest)


def test_save_refuses_a_non_empty_directory_unless_overwrite(tmp_path: Path) -> None:
    head_mask, neuron_mask = masks("binary")
    pruned = cut_pruned_model(build("vision"), head_mask, neuron_mask)
    plan = plan_from_masks(head_mask, neuron_mask)
    output = tmp_path / "pruned"
    output.mkdir()
    (output / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"pruned already exists and is not empty; .* --overwrite"):
        save_pruned(pruned, output, plan)
    with pytest.raises(FileExistsError, match=r"pruned holds files clip-prune did not write .*\(old.txt\)"):
        save_pruned(pruned, output, plan, overwrite=True)  # a file of the user's: never replaced
    assert (output / "old.txt").read_text() == "keep me"
    (output / "old.txt").unlink()
    save_pruned(pruned, output, plan)
    before = (output / "model.safetensors").stat().st_ino
    save_pruned(pruned, output, plan, overwrite=True)  # clip-prune's own folder: replaced
    assert (output / "model.safetensors").stat().st_ino != before
    assert [path.name for path in tmp_path.iterdir()] == ["pruned"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pruned(pruned, empty, plan)
    assert (empty / "config.json").exists()


def test_save_rejects_wrong_inputs(tmp_path: Path) -> None:
    head_mask, neuron_mask = masks("binary")
    model = build("vision")
    with pytest.raises(TypeError, match="needs a pruned model from cut_pruned_model"):
        save_pruned(model, tmp_path / "out", plan_from_masks(head_mask, neuron_mask))
    pruned = cut_pruned_model(model, head_mask, neuron_mask)
    with pytest.raises(ValueError, match="the plan does not match the model"):
        save_pruned(pruned, tmp_path / "out", plan_from_masks(*masks("no_heads")))


def test_load_pruned_rejects_other_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json, so it is not a pruned model directory"):
        load_pruned(tmp_path)
    build("vision").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="type 'clip_vision_model', not a pruned model"):
        load_pruned(tmp_path / "dense")


def test_package_exports_load_pruned() -> None:
    assert clip_prune.load_pruned is load_pruned


def test_pruned_configs() -> None:
    head_mask, neuron_mask = masks("no_heads")
    plan = plan_from_masks(head_mask, neuron_mask)
    config = ClipTower.pruned_config(clip_config(), [len(layer.heads) for layer in plan],
                                    [len(layer.neurons) for layer in plan])
    assert isinstance(config, PrunedCLIPConfig) and isinstance(config.vision_config, PrunedCLIPVisionConfig)
    assert config.vision_config.heads_per_layer == [len(layer.heads) for layer in plan]
    assert config.vision_config.model_type == "clip_pruned_vision_model"
    assert PrunedCLIPConfig.from_dict(config.to_dict()).vision_config.neurons_per_layer == \
        config.vision_config.neurons_per_layer
    dense = PrunedCLIPVisionConfig(num_hidden_layers=2)
    assert dense.heads_per_layer == [12, 12] and dense.neurons_per_layer == [3072, 3072]
    with pytest.raises(Exception, match="heads_per_layer has 1 entries but num_hidden_layers is 2"):
        PrunedCLIPVisionConfig(num_hidden_layers=2, heads_per_layer=[3])
    with pytest.raises(Exception, match=r"neurons_per_layer must lie in \[0, 3072\]"):
        PrunedCLIPVisionConfig(num_hidden_layers=1, neurons_per_layer=[4000])


@pytest.mark.parametrize("model_kind", ["vision", "siglip_vision", "siglip2_vision"])
def test_pruned_model_from_config_is_initialised(model_kind: str) -> None:
    dense = build(model_kind)
    plan = plan_from_masks(*masks("both_empty"))
    tower = tower_of(dense)
    config = tower.pruned_config(dense.config, [len(layer.heads) for layer in plan],
                                 [len(layer.neurons) for layer in plan])
    model = tower.pruned_classes[dense.config.model_type](config)
    assert model_kind != "vision" or type(model) is PrunedCLIPVisionModel
    assert isinstance(model.encoder.layers[1].self_attn, ConstantAttention)
    assert torch.equal(model.encoder.layers[1].self_attn.out_proj.bias, torch.zeros(32))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(**inputs_of(dense)).pooler_output).all()


@pytest.mark.parametrize("mask_kind", ["binary", "both_empty", "no_heads"])
@pytest.mark.parametrize("model_kind", ["clip", *FAMILIES[2:]])
def test_counted_macs_match_the_analytic_model(model_kind: str, mask_kind: str) -> None:
    model = build(model_kind)
    head_mask, neuron_mask = masks(mask_kind)
    macs = mac_costs(tower_of(model).vision.config)
    assert macs.tokens == {"clip": 226, "siglip": 25, "siglip_vision": 25, "siglip2": 256}[model_kind]
    assert counted_vision_macs(model) == macs.dense
    pruned = cut_pruned_model(model, head_mask, neuron_mask)
    assert counted_vision_macs(pruned) == macs.of_masks(head_mask, neuron_mask)
    if model_kind != "clip":  # below, the whole tower: SigLIP's pooling head adds its own attention and MLP
        return

    # The whole tower adds only the patch embedding (the model's other MACs are layer norms, biases,
    # softmax, which the counter ignores): (T - 1) patches x D outputs x (C · p²) inputs.
    config = tower_of(model).vision.config
    patch_macs = (macs.tokens - 1) * config.hidden_size * config.num_channels * config.patch_size ** 2
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        tower_of(pruned).vision(pixel_values=pixels(batch=1))
    assert counter.get_total_flops() == 2 * (macs.of_masks(head_mask, neuron_mask) + patch_macs)


def test_counted_macs_at_another_image_size() -> None:
    model = build("vision")
    head_mask, neuron_mask = masks("rescaled")
    pruned = cut_pruned_model(model, head_mask, neuron_mask)
    macs = mac_costs(vision_config(image_size=20))
    assert counted_vision_macs(pruned, image_size=20) == macs.of_masks(head_mask, neuron_mask)


def test_bad_masks_are_rejected() -> None:
    model = build("vision")
    head_mask, neuron_mask = masks("binary")
    with pytest.raises(ValueError, match=r"head_mask has shape \[3, 5\] but the model needs \[3, 4\]"):
        cut_pruned_model(model, torch.ones(3, 5), neuron_mask)
    with pytest.raises(ValueError, match=r"neuron_mask has shape \[2, 37\] but the model needs \[3, 37\]"):
        slice_vision_tower(copy.deepcopy(model), head_mask, neuron_mask[:2])
    with pytest.raises(ValueError, match="head_mask has 3 layers but neuron_mask has 2"):
        plan_from_masks(head_mask, neuron_mask[:2])
    nan_mask = head_mask.clone()
    nan_mask[0, 0] = float("nan")
    with pytest.raises(ValueError, match="head_mask contains NaN or infinite values"):
        cut_pruned_model(model, nan_mask, neuron_mask)
    with pytest.raises(ValueError, match="neuron_mask must be 2-D"):
        plan_from_masks(head_mask, neuron_mask[0])
    with pytest.raises(ValueError, match="prune every head and every neuron of every layer"):
        cut_pruned_model(model, torch.zeros_like(head_mask), torch.zeros_like(neuron_mask))
    with pytest.raises(TypeError, match="expected a transformers model with a config, got Linear"):
        cut_pruned_model(torch.nn.Linear(2, 2), head_mask, neuron_mask)
    sliced = slice_vision_tower(copy.deepcopy(model), head_mask, neuron_mask)
    with pytest.raises(ValueError, match="encoder layer 0 is already pruned"):
        slice_vision_tower(sliced, head_mask, neuron_mask)
    with pytest.raises(ValueError, match="one scale per kept unit"):
        LayerPlan(heads=[0, 1], head_scales=[1.0], neurons=[], neuron_scales=[])


def test_read_masks_errors(tmp_path: Path) -> None:
    config = vision_config()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_masks(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"has no head_mask.pt \(found: nothing\)"):
        read_masks(tmp_path)
    head_mask, neuron_mask = masks("rescaled")
    torch.save(head_mask, tmp_path / "head_mask.pt")
    with pytest.raises(FileNotFoundError, match="no neuron_mask.pt; pass the model's vision_config"):
        read_masks(tmp_path)
    read_heads, read_neurons = read_masks(tmp_path, config)
    assert torch.equal(read_heads, head_mask) and torch.equal(read_neurons, torch.ones(LAYERS, NEURONS))
    torch.save(neuron_mask.double(), tmp_path / "neuron_mask.pt")
    read_heads, read_neurons = read_masks(tmp_path)
    assert read_neurons.dtype == torch.float32 and torch.equal(read_neurons, neuron_mask)
    with pytest.raises(ValueError, match=r"head_mask has shape \[3, 4\] but the model needs \[3, 6\]"):
        read_masks(tmp_path, vision_config(num_attention_heads=6, hidden_size=36))
    torch.save({"mask": head_mask}, tmp_path / "head_mask.pt")
    with pytest.raises(ValueError, match="holds a dict, expected a tensor"):
        read_masks(tmp_path)
    torch.save(LayerPlan([], [], [], []), tmp_path / "head_mask.pt")
    with pytest.raises(ValueError, match=r"could not read .*head_mask.pt as a tensor with torch.load"):
        read_masks(tmp_path)


@pytest.fixture(scope="module")
def vit_b16() -> CLIPVisionModel:
    """ViT-B/16 shapes (L=12, H=12, F=3072, D=768) with random weights, at 64 px to keep forwards quick."""
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=64)).eval()


@pytest.mark.skipif(not ORIGINAL_MASKS.is_dir(),
                    reason=f"original tool's masks not found at {ORIGINAL_MASKS} "
                    "(CI keeps ../shared/fixtures beside the checkout)")
@pytest.mark.parametrize(("constraint", "kept_heads", "kept_neurons"),
                         [("0.4", 84, 10933), ("0.75", 124, 25337)])
def test_original_tool_masks(vit_b16: CLIPVisionModel, constraint: str, kept_heads: int,
                             kept_neurons: int) -> None:
    head_mask, neuron_mask = read_masks(ORIGINAL_MASKS / constraint, vit_b16.config)
    assert head_mask.shape == (12, 12) and neuron_mask.shape == (12, 3072)
    plan = plan_from_masks(head_mask, neuron_mask)
    assert sum(len(layer.heads) for layer in plan) == kept_heads
    assert sum(len(layer.neurons) for layer in plan) == kept_neurons
    assert all(layer.heads for layer in plan), "the README says no layer loses all heads"

    x = pixels(batch=1, size=64)
    expected = masked_outputs(vit_b16, head_mask, neuron_mask, x)
    pruned = cut_pruned_model(vit_b16, head_mask, neuron_mask)
    assert pruned.config.heads_per_layer == [len(layer.heads) for layer in plan]
    actual = image_outputs(pruned, x)
    # scales up to |33| make the outputs larger than the tiny model's: compare relative to their size
    for name in expected:
        scale = expected[name].abs().max().item()
        error = (actual[name] - expected[name]).abs().max().item()
        assert error <= 1e-5 * max(scale, 1.0), f"{name}: max abs error {error:.3g} (scale {scale:.3g})"
    macs = mac_costs(vit_b16.config)
    assert counted_vision_macs(pruned) == macs.of_masks(head_mask, neuron_mask)
