"""`MaskedCLIPModule`: a frozen CLIP-family model with hooked masks whose validation loop gathers Fisher information."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch

from clip_prune.core.pruning.fisher import FisherInformation
from clip_prune.core.pruning.losses import distill_loss, distill_noise, gather_across_ranks
from clip_prune.core.pruning.masks import VisionMasks, mask_shapes
from clip_prune.data.sampling import PADDING
from clip_prune.startup import STARTUP
from clip_prune.towers import inputs_to, load_model, tower_of

LossName = Literal["contrastive", "distill"]
AttentionName = Literal["sdpa", "eager"]


class MaskedCLIPModule(L.LightningModule):
    """A frozen CLIP whose vision tower carries head and neuron masks; validation gathers their Fisher information.

    Args:
        pretrained: Hub name or local folder of a checkpoint of a supported family (`clip_prune.towers`):
            CLIP, SigLIP or SigLIP2, full or vision-only.
        loss: `contrastive`, the family's own image-text loss (CLIP's InfoNCE, SigLIP's sigmoid loss)
            between image embeddings and captions of the frozen text tower (needs a full model), or
            `distill`, label-free on images only.
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
        STARTUP.lap("arguments")
        super().__init__()
        self.save_hyperparameters()
        self.model = load_model(pretrained, attn_implementation)
        self.tower = tower_of(self.model)
        self.model.requires_grad_(False)
        self.model.eval()
        self.masks = VisionMasks(self.model)
        (layers, heads), (_, neurons) = mask_shapes(self.vision_config)
        self.fisher = FisherInformation(layers, heads, neurons)
        self.collect_fisher = True
        STARTUP.lap("model_load")

    def check_loss(self, tokenizer_available: bool) -> None:
        """Refuse, before any pass over the data, a loss this checkpoint cannot compute."""
        if self.hparams.loss != "contrastive":
            return
        if not self.tower.has_text:
            raise ValueError(
                f"--model.loss=contrastive needs the model's text tower, but {self.hparams.pretrained!r} is "
                "vision-only; use --model.loss=distill"
            )
        if not tokenizer_available:
            raise ValueError(
                f"--model.loss=contrastive needs captions, but {self.hparams.pretrained!r} has no tokenizer; save "
                "one beside the model or use --model.loss=distill"
            )

    @property
    def vision_config(self) -> Any:
        """The config of the vision tower."""
        return self.tower.config

    def mask_loss(self, batch: dict[str, torch.Tensor], real: torch.Tensor | slice) -> torch.Tensor:
        """The loss whose gradients w.r.t. the masks give the Fisher information.

        Args:
            batch: the calibration batch.
            real: [B] False for DDP padding items, which the loss leaves out (`slice(None)`: none).

        Under DDP the contrastive loss is the global batch's (every rank's images and captions, the
        same on every rank), so each sample meets the negatives it would meet in one process.
        """
        # uint8 pixels are normalised here, on the device (`inputs_to`; the batch is already there)
        inputs = inputs_to(self.tower.vision_inputs(batch), self.device, self.model.dtype)
        image_embeds = self.tower.image_embeds(inputs)[real]
        match self.hparams.loss:
            case "contrastive":
                with torch.no_grad():
                    text_embeds = self.tower.text_embeds(batch["input_ids"], batch.get("attention_mask"))[real]
                return self.tower.loss(gather_across_ranks(image_embeds.float()),
                                       gather_across_ranks(text_embeds.float()))
            case "distill":
                return distill_loss(image_embeds, batch["index"][real], self.hparams.noise_seed,
                                    None if "distill_noise" not in batch else batch["distill_noise"][real])

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Decide on the host, where the sample ids are, what would otherwise wait for the device once per batch:
        whether the batch holds DDP padding items (`padded`), and with `distill` its noise."""
        if "index" not in batch:
            return batch
        if STARTUP.running:
            STARTUP.stop("first_batch")  # DataLoader workers started, the first images decoded
        batch["padded"] = bool((batch["index"] == PADDING).any())
        if self.hparams.loss == "distill":
            batch["distill_noise"] = distill_noise(batch["index"], self.tower.embed_dim, self.hparams.noise_seed)
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
