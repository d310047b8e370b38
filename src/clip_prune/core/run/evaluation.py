"""What pruning costs: retrieval recall@k and zero-shot accuracy of a (masked or pruned) model, alone
and as the first stage of a dense re-ranking cascade.

Pruning touches only the vision tower, so caption and class-prompt embeddings are computed
once per run and reused for the dense, masked and pruned models. Rankings use the cosine of the
embeddings: every family's pair score (`VisionTower.logits`: CLIP's scaled cosine, SigLIP's scaled
cosine plus bias, through a sigmoid) is an increasing function of it, so ranks and recalls are the
family's own.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import zip_longest
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from clip_prune.core.run.cascade import (
    CascadeResult,
    CascadeSeconds,
    Shortlists,
    cascade_macs,
    cascade_recall,
    check_top_m,
    shortlist_images,
)
from clip_prune.core.run.costs import analytic_macs_per_image
from clip_prune.core.run.metrics import retrieval_recall, zero_shot_accuracy
from clip_prune.core.timing import timed_call
from clip_prune.data.coco import ImageItems, RetrievalSplit, ZeroShotSplit, text_length_limit
from clip_prune.towers import image_embeds, inputs_to, tower_of

Scores = dict[str, dict[str, float]]
"""A model's metrics in percent, by task and name: `scores["retrieval"]["t2i_R@1"]`, `scores["zero_shot"]["top1"]`."""


class Evaluator:
    """Scores models on an evaluation split and a zero-shot tree (`CocoDataModule.evaluator` builds one).

    Args:
        retrieval: every evaluation image with all its captions, or None.
        zero_shot: labelled images and prompt templates, or None.
        tokenizer: the checkpoint's tokenizer (None for a vision-only checkpoint: nothing to score).
        batch_size: images per forward pass.
        num_workers: image-loading worker processes.
        device: where the models run.
        progress: show progress bars.
    """

    def __init__(self, retrieval: RetrievalSplit | None, zero_shot: ZeroShotSplit | None, tokenizer: Any | None,
                 batch_size: int, num_workers: int, device: torch.device, progress: bool = True) -> None:
        self.retrieval = retrieval
        self.zero_shot = zero_shot
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.progress = progress
        self._texts: dict[str, torch.Tensor] = {}
        self._dense: tuple[PreTrainedModel, Scores, torch.Tensor] | None = None

    def __call__(self, model: PreTrainedModel, name: str) -> Scores:
        """Metrics of `model` (in percent); `name` labels the progress bars."""
        return self._score(model, name)[0]

    def compare(self, dense: PreTrainedModel, pruned: PreTrainedModel | None,
                cascade_top_m: list[int] | None = None) -> Comparison:
        """Metrics of the dense model and, if given, the pruned one, how closely its image embeddings follow the
        dense model's (`cosine_to_dense`, the one measure a vision-only model has) and their cascades
        (`cascade_top_m`)."""
        if self._dense is None or self._dense[0] is not dense:  # scored once for the points of a run
            self._dense = (dense, *self._score(dense, "dense"))
        _, dense_metrics, dense_images = self._dense
        if pruned is None:
            return Comparison(dense_metrics)
        pruned_metrics, pruned_images = self._score(pruned, "pruned")
        cascade: list[CascadeResult] = []
        if cascade_top_m:
            if self.retrieval is None or not tower_of(pruned).has_text:
                warnings.warn("--cascade_top_m needs a model with its text tower and the retrieval split; "
                              "no cascade measured", stacklevel=2)
            else:
                cascade = self._cascade(dense, pruned, pruned_images, cascade_top_m)
        return Comparison(dense_metrics, pruned_metrics, cosine_to_dense(dense_images, pruned_images), cascade)

    def _score(self, model: PreTrainedModel, name: str) -> tuple[Scores, torch.Tensor]:
        """Metrics of `model` (none for a vision-only one) and its image embeddings [N_img, E] of the retrieval split,
        or of the zero-shot tree where there is no retrieval split."""
        has_text = tower_of(model).has_text
        if has_text and self.tokenizer is None:
            raise ValueError("the checkpoint has no tokenizer, so captions and prompts cannot be embedded; "
                             "save the tokenizer beside the model to evaluate it")
        results: Scores = {}
        images = None
        if self.retrieval is not None:
            images, _ = self._encode_images(model, self.retrieval.images, f"{name}: retrieval images")
            if has_text:
                texts = self._encode_texts_once(model, "captions", self.retrieval.captions)
                results["retrieval"] = retrieval_recall(images, texts, self.retrieval.text_to_image.to(images.device))
        if self.zero_shot is not None and (has_text or images is None):
            shot_images, labels = self._encode_images(model, self.zero_shot.images, f"{name}: zero-shot images")
            images = shot_images if images is None else images
            if has_text:
                prompts = [template.format(c) for c in self.zero_shot.class_names
                           for template in self.zero_shot.templates]
                classes = len(self.zero_shot.class_names)
                texts = self._encode_texts_once(model, "prompts", prompts).view(classes, -1, shot_images.shape[-1])
                results["zero_shot"] = zero_shot_accuracy(shot_images, texts, labels)
        assert images is not None, "an Evaluator needs a retrieval split or a zero-shot tree"
        return results, images

    def _cascade(self, dense: PreTrainedModel, pruned: PreTrainedModel, pruned_images: torch.Tensor,
                top_ms: list[int]) -> list[CascadeResult]:
        """Text-to-image recall and cost of the pruned-then-dense cascade for each M in `top_ms`.

        The dense embeddings the cascade re-ranks with come from encoding only the images of the
        top-M lists, timed against the whole gallery's dense and pruned encodings (`time_encodings`).
        """
        texts = self._texts["captions"]
        text_to_image = self.retrieval.text_to_image.to(pruned_images.device)
        shortlists = [shortlist_images(pruned_images, texts, text_to_image, top_m) for top_m in check_top_m(top_ms)]
        subsets = [lists.reranked_images().cpu() for lists in shortlists]
        timings = time_encodings(dense, pruned, self.retrieval.images, subsets, self.batch_size, self.num_workers,
                                 self.device, self.progress)
        dense_macs, pruned_macs = analytic_macs_per_image(dense), analytic_macs_per_image(pruned)
        results = []
        for lists, subset, reranking_s, embeds in zip(shortlists, subsets, timings.subset_s, timings.subset_embeds,
                                                      strict=True):
            results.append(self._cascade_entry(lists, subset, embeds, reranking_s, timings, dense_macs, pruned_macs))
        return results

    def _cascade_entry(self, lists: Shortlists, subset: torch.Tensor, embeds: torch.Tensor, reranking_s: float,
                       timings: EncodingTimes, dense_macs: int, pruned_macs: int) -> CascadeResult:
        texts = self._texts["captions"]
        dense_rows = torch.full((lists.num_images, embeds.shape[1]), float("nan"), device=embeds.device)
        dense_rows[subset.to(embeds.device)] = embeds  # only the re-ranked images have a dense embedding
        return CascadeResult(
            top_m=lists.top_m,
            retrieval=cascade_recall(dense_rows, texts, self.retrieval.text_to_image.to(embeds.device), lists),
            images=lists.num_images, reranked_images=len(subset),
            macs=cascade_macs(lists, dense_macs, pruned_macs),
            seconds=CascadeSeconds(timings.dense_s, timings.pruned_s, reranking_s, str(self.device), self.batch_size))

    @torch.no_grad()
    def _encode_images(self, model: PreTrainedModel, images: ImageItems,
                       desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = DataLoader(images, batch_size=self.batch_size, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        embeds, labels, tower = [], [], tower_of(model)
        for batch in tqdm(loader, desc=desc, disable=not self.progress, leave=False):
            inputs = inputs_to(tower.vision_inputs(batch), self.device, model.dtype, non_blocking=True)
            embeds.append(F.normalize(tower.image_embeds(inputs).float(), dim=-1))
            labels.append(batch["label"].to(self.device))
        return torch.cat(embeds), torch.cat(labels)

    @torch.no_grad()
    def _encode_texts_once(self, model: PreTrainedModel, key: str, texts: list[str]) -> torch.Tensor:
        if key not in self._texts:
            limit, tower = text_length_limit(self.tokenizer, model.config), tower_of(model)
            chunks = []
            for start in range(0, len(texts), self.batch_size * 4):
                tokens = self.tokenizer(texts[start : start + self.batch_size * 4], padding=tower.text_padding,
                                        truncation=True, max_length=limit, return_tensors="pt").to(self.device)
                embeds = tower.text_embeds(tokens["input_ids"], tokens.get("attention_mask"))
                chunks.append(F.normalize(embeds.float(), dim=-1))
            self._texts[key] = torch.cat(chunks)
        return self._texts[key]


@dataclass(frozen=True)
class Agreement:
    """How closely the pruned model's image embeddings follow the dense model's: cosines over `images` images."""

    mean: float
    min: float
    images: int


def cosine_to_dense(dense: torch.Tensor, pruned: torch.Tensor) -> Agreement:
    """Mean and lowest cosine between each image's pruned and dense embeddings ([N, E] rows of unit length)."""
    cosines = (dense * pruned).sum(dim=-1)
    return Agreement(float(cosines.mean()), float(cosines.min()), len(cosines))


@dataclass(frozen=True)
class Comparison:
    """The dense model's metrics and, for a pruned model, its own, its agreement with the dense model and its
    cascades (one per M)."""

    dense: Scores
    pruned: Scores | None = None
    cosine_to_dense: Agreement | None = None
    cascade: list[CascadeResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """As `report.json` and `clip-prune evaluate --output_json` hold it."""
        entry: dict[str, Any] = {"dense": self.dense}
        if self.pruned is not None:
            entry["pruned"] = self.pruned
        if self.cosine_to_dense is not None:
            entry["cosine_to_dense"] = asdict(self.cosine_to_dense)
        if self.cascade:
            entry["cascade"] = [result.to_json() for result in self.cascade]
        return entry


@dataclass(frozen=True)
class EncodingTimes:
    """Seconds of image-encoder forward passes over a gallery, summed over its batches."""

    dense_s: float
    """The dense model over every image."""
    pruned_s: float
    """The pruned model over every image."""
    subset_s: list[float]
    """The dense model over each subset of images."""
    subset_embeds: list[torch.Tensor]
    """L2-normalised dense embeddings of each subset, [len(subset), E], in the subset's order."""


@torch.no_grad()
def time_encodings(dense: PreTrainedModel, pruned: PreTrainedModel, images: ImageItems, subsets: list[torch.Tensor],
                   batch_size: int, num_workers: int, device: torch.device, progress: bool = True,
                   repeats: int = 3) -> EncodingTimes:
    """Time the dense and pruned encoders over all `images` and the dense one over each subset, in turns.

    Each step encodes the next batch of every job (dense all, pruned all, dense subset 1, ...)
    `repeats` times in turns and keeps each job's median, so that drifts and bursts of the machine's
    load touch all jobs alike (as `apply.measure_latencies` does); a job's time is the sum over its
    batches. Subsets are packed into full batches of their own. Only the forward passes are timed
    (after a warm-up of two passes per model): image decoding and host-to-device copies are left out.
    """
    loaders = [DataLoader(images, batch_size=batch_size, num_workers=num_workers)]
    loaders += [DataLoader(Subset(images, subset.tolist()), batch_size=batch_size, num_workers=num_workers)
                for subset in subsets]
    jobs = [(dense, 0), (pruned, 0)] + [(dense, index + 1) for index in range(len(subsets))]
    first = next(iter(loaders[0]))
    for model in (dense, pruned):
        for _ in range(2):
            image_embeds(model, inputs_to(tower_of(model).vision_inputs(first), device, model.dtype))
    seconds = [0.0] * len(jobs)
    embeds: list[list[torch.Tensor]] = [[] for _ in subsets]
    steps = tqdm(zip_longest(*loaders), total=len(loaders[0]), desc="cascade: timing encoders",
                 disable=not progress, leave=False)
    for batches in steps:
        work = [(job, model, inputs_to(tower_of(model).vision_inputs(batches[loader]), device, model.dtype))
                for job, (model, loader) in enumerate(jobs) if batches[loader] is not None]
        times: dict[int, list[float]] = {job: [] for job, _, _ in work}
        outputs: dict[int, torch.Tensor] = {}
        for _ in range(repeats):
            for job, model, inputs in work:
                elapsed, outputs[job] = timed_call(partial(image_embeds, model, inputs), torch.device(device))
                times[job].append(elapsed)
        for job in times:
            seconds[job] += statistics.median(times[job])
            if job >= 2:
                embeds[job - 2].append(F.normalize(outputs[job].float(), dim=-1))
    return EncodingTimes(seconds[0], seconds[1], seconds[2:], [torch.cat(parts) for parts in embeds])
