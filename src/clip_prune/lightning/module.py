"""`MaskedCLIPModule`: a frozen CLIP-family model with hooked masks whose validation loop gathers Fisher information."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import lightning as L
import torch

from clip_prune.core.pruning.fisher import FisherInformation, FisherStatistics
from clip_prune.core.pruning.fisher_pass import accumulate_fisher
from clip_prune.core.pruning.losses import distill_noise
from clip_prune.core.pruning.masks import VisionMasks, mask_shapes
from clip_prune.core.pruning.refit import RefitWeights, refit_applied
from clip_prune.data.sampling import PADDING
from clip_prune.startup import STARTUP
from clip_prune.towers import load_model, tower_of

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
        self._gathers_fisher = True
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

    @contextmanager
    def masked_as(self, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None,
                  refit: RefitWeights | None = None, gather_fisher: bool = True) -> Iterator[None]:
        """Within the block the model computes under these masks (all ones where None) with these refit columns in
        its weights, as a step or a sensitivity round left it, and validation passes gather Fisher statistics afresh,
        or none (`gather_fisher` False: a pass that only feeds the callbacks the calibration images). Afterwards the
        model is dense again, even after an error: it stays the teacher of every step."""
        self.fisher.reset()
        self._gathers_fisher = gather_fisher
        ones = torch.ones_like(self.masks.head_mask), torch.ones_like(self.masks.neuron_mask)
        head_mask = ones[0] if head_mask is None else head_mask
        neuron_mask = ones[1] if neuron_mask is None else neuron_mask
        with ExitStack() as refitted:
            self.masks.set(head_mask, neuron_mask)
            if refit:
                refitted.enter_context(refit_applied(self.model, head_mask, neuron_mask, refit))
            try:
                yield
            finally:
                self.masks.set(*ones)
                self._gathers_fisher = True

    def remove_masks(self) -> None:
        """Detach the mask hooks for good: the model is the dense reference of saving and evaluation from here on."""
        self.masks.remove()

    def statistics(self) -> FisherStatistics:
        """The Fisher statistics of the last pass, summed across ranks."""
        return self.fisher.compute()

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
        if not self._gathers_fisher:
            return
        # Boolean indexing waits for the device (it must count the rows): only where padding exists.
        real = batch["index"] != PADDING if batch.get("padded", True) else slice(None)
        accumulate_fisher(self.fisher, self.masks, self.model, batch, self.hparams.loss, self.hparams.noise_seed, real)

    def configure_optimizers(self) -> None:
        """Nothing is trained: all weights stay frozen."""
        return None
