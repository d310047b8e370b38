"""`MaskedCLIPModule`: a frozen CLIP with hooked masks whose validation loop gathers Fisher information."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, CLIPModel, CLIPVisionModel, PreTrainedModel

from clip_prune.data.sampling import PADDING
from clip_prune.model.masking import VisionMasks, mask_shapes, vision_tower
from clip_prune.pruning.fisher import FisherInformation

LossName = Literal["contrastive", "distill"]
AttentionName = Literal["sdpa", "eager"]


def load_clip(pretrained: str, attn_implementation: AttentionName = "sdpa") -> CLIPModel | CLIPVisionModel:
    """Load a CLIP checkpoint (Hub name or local folder), refusing anything that is not CLIP."""
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        local = Path(pretrained).resolve()
        where = (f"the folder {local} has no usable config.json" if local.exists()
                 else f"no folder {local} exists, and the Hub lookup failed")
        raise OSError(
            f"cannot load a model config from --model.pretrained={pretrained!r}: {where} ({error}). Give a Hub "
            "name such as openai/clip-vit-base-patch16 or a folder written by save_pretrained."
        ) from error
    classes = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModel}
    if config.model_type not in classes:
        raise TypeError(
            f"--model.pretrained={pretrained!r} is a {config.model_type!r} model, not a CLIP model; clip-prune "
            "prunes the vision tower of CLIP checkpoints (model_type 'clip' or 'clip_vision_model')."
        )
    return classes[config.model_type].from_pretrained(pretrained, attn_implementation=attn_implementation)


def image_embeddings(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Image embeddings [B, E]: projected for a CLIPModel, pooled CLS state for a vision-only model."""
    if isinstance(model, CLIPModel):
        return model.get_image_features(pixel_values=pixel_values).pooler_output
    return vision_tower(model)(pixel_values=pixel_values).pooler_output


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP InfoNCE over in-batch negatives, with the model's own temperature."""
    logits = logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def gather_across_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every DDP rank's `local` [B_r, E], concatenated in rank order [Σ B_r, E] (B_r may differ, even be 0).

    Gradients flow only into this rank's own part: the other ranks' rows are constants here, and each
    rank differentiates the same global loss with respect to its own samples. Outside DDP, `local` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], device=local.device))
    largest = max(int(size) for size in sizes)
    padded = local.detach().new_zeros((largest, *local.shape[1:]))
    padded[: len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    parts = [part[: int(size)] for part, size in zip(parts, sizes, strict=True)]
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def distill_noise(sample_ids: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """[B, dim] Gaussian samples ε_n, each drawn from (seed, sample id) alone, on the host."""
    return torch.stack([
        torch.randn(dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in sample_ids.tolist()
    ])


def distill_loss(image_embeds: torch.Tensor, sample_ids: torch.Tensor, seed: int,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """Label-free loss whose per-sample gradients estimate the true Fisher of the image embedding.

    The normalised embedding e_n is pulled towards a Gaussian sample around its own value,
    e_n + ε_n; a plain masked-vs-dense distance would have zero gradient at the dense
    model. ε_n depends only on (seed, sample id), so the statistics do not depend on batch
    composition or on the number of processes. Summed (not averaged) over the batch.
    `noise` is `distill_noise(sample_ids, E, seed)` made before the batch went to the device:
    drawing it here from device-resident ids would wait for the device once per batch.
    """
    if len(sample_ids) == 0:  # a DDP rank whose share of the last global batch is a padding item
        return image_embeds.float().sum()
    embeds = F.normalize(image_embeds.float(), dim=-1)
    if noise is None:
        noise = distill_noise(sample_ids, embeds.shape[-1], seed)
    return 0.5 * (embeds - (embeds.detach() + noise.to(embeds.device))).square().sum()


class MaskedCLIPModule(L.LightningModule):
    """A frozen CLIP whose vision tower carries head and neuron masks; validation gathers their Fisher information.

    Args:
        pretrained: Hub name or local folder of a CLIP checkpoint (CLIPModel or CLIPVisionModel).
        loss: `contrastive`, CLIP's InfoNCE between image embeddings and captions of the frozen
            text tower (needs a CLIPModel), or `distill`, label-free on images only.
        attn_implementation: attention kernel of the vision tower.
        noise_seed: seed of the `distill` loss's Gaussian samples.
    """

    def __init__(
        self,
        pretrained: str,
        loss: LossName = "contrastive",
        attn_implementation: AttentionName = "sdpa",
        noise_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = load_clip(pretrained, attn_implementation)
        self.model.requires_grad_(False)
        self.model.eval()
        self.masks = VisionMasks(self.model)
        (layers, heads), (_, neurons) = mask_shapes(self.vision_config)
        self.fisher = FisherInformation(layers, heads, neurons)
        self.collect_fisher = True

    def check_loss(self, tokenizer_available: bool) -> None:
        """Refuse, before any pass over the data, a loss this checkpoint cannot compute."""
        if self.hparams.loss != "contrastive":
            return
        if not isinstance(self.model, CLIPModel):
            raise ValueError(
                f"--model.loss=contrastive needs a CLIPModel with its text tower, but {self.hparams.pretrained!r} is "
                "vision-only; use --model.loss=distill"
            )
        if not tokenizer_available:
            raise ValueError(
                f"--model.loss=contrastive needs captions, but {self.hparams.pretrained!r} has no tokenizer; save "
                "one beside the model or use --model.loss=distill"
            )

    @property
    def vision_config(self) -> Any:
        """The `CLIPVisionConfig` of the vision tower."""
        return vision_tower(self.model).config

    def mask_loss(self, batch: dict[str, torch.Tensor], real: torch.Tensor | slice) -> torch.Tensor:
        """The loss whose gradients w.r.t. the masks give the Fisher information.

        Args:
            batch: the calibration batch.
            real: [B] False for DDP padding items, which the loss leaves out (`slice(None)`: none).

        Under DDP the contrastive loss is the global batch's (every rank's images and captions, the
        same on every rank), so each sample meets the negatives it would meet in one process.
        """
        image_embeds = image_embeddings(self.model, batch["pixel_values"])[real]
        match self.hparams.loss:
            case "contrastive":
                with torch.no_grad():
                    text_embeds = self.model.get_text_features(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).pooler_output[real]
                return contrastive_loss(gather_across_ranks(image_embeds.float()),
                                        gather_across_ranks(text_embeds.float()), self.model.logit_scale.float())
            case "distill":
                return distill_loss(image_embeds, batch["index"][real], self.hparams.noise_seed,
                                    None if "distill_noise" not in batch else batch["distill_noise"][real])

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Decide on the host, where the sample ids are, what would otherwise wait for the device once per batch:
        whether the batch holds DDP padding items (`padded`), and with `distill` its noise."""
        if "index" not in batch:
            return batch
        batch["padded"] = bool((batch["index"] == PADDING).any())
        if self.hparams.loss == "distill":
            clip = isinstance(self.model, CLIPModel)
            dim = self.model.config.projection_dim if clip else self.vision_config.hidden_size
            batch["distill_noise"] = distill_noise(batch["index"], dim, self.hparams.noise_seed)
        return batch

    def on_validation_epoch_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Fisher collection needs gradients, but the Trainer runs validation in inference mode; "
                "set trainer.inference_mode: false (the clip-prune CLI does so by default)"
            )
        # bf16/half precision plugins convert submodules; the sums stay float64.
        self.fisher.set_dtype(torch.float64)
        self.masks.set(self.masks.head_mask.to(self.device), self.masks.neuron_mask.to(self.device))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if not self.collect_fisher:
            return
        # Boolean indexing waits for the device (it must count the rows): only where padding exists.
        real = batch["index"] != PADDING if batch.get("padded", True) else slice(None)
        with torch.enable_grad(), self.masks.tracking_samples():
            loss = self.mask_loss(batch, real)
            head_grads, neuron_grads = self.masks.per_sample_grads(loss)
        self.fisher.update(head_grads[real], neuron_grads[real])

    def configure_optimizers(self) -> None:
        """Nothing is trained: all weights stay frozen."""
        return None
