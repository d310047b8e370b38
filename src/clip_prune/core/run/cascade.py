"""Two-stage text-to-image search: the pruned image encoder ranks the gallery, the dense one re-ranks the top M.

The job the pruned model was made for (the original tool's parent project, "Model Cascades for
Efficient Image Search"): each caption's M best images under the pruned model are re-scored with
the dense model's embeddings; the other images keep their pruned order after those M. Only the
distinct images in the union of the top-M lists need a dense encoding, which is what the cascade
saves against encoding the whole gallery with the dense model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_prune.core.run.metrics import check_retrieval_inputs, nan_first


@dataclass(frozen=True)
class Shortlists:
    """The first stage's output: for each caption, the M images the dense model re-ranks."""

    top_m: int
    """M, images passed on per caption as asked for (a gallery of fewer images passes on all of them)."""
    images: Tensor
    """[N_txt, min(M, N_img)] image indices per caption: its own image first when it made the cut, then
    the best wrong images by the pruned model."""
    first_stage_ranks: Tensor
    """[N_txt] rank of each caption's image under the pruned model (wrong images scoring at least as
    high; N_img when its score is NaN), as `retrieval_recall` counts it."""
    num_images: int
    """N_img, the gallery size."""

    def reranked_images(self) -> Tensor:
        """Sorted indices of the distinct images in the union of the top-M lists: those the dense model encodes."""
        return torch.unique(self.images)


def check_top_m(top_m: list[int] | None) -> list[int]:
    """The distinct values of `--cascade_top_m`, ascending; refuses a value that is not a positive integer."""
    values = list(top_m or [])
    bad = [value for value in values if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1)]
    if bad:
        raise ValueError(f"--cascade_top_m values must be positive integers (images the dense model re-ranks per "
                         f"caption, e.g. '[10, 50]'), got {bad}")
    return sorted(set(values))


@torch.no_grad()
def shortlist_images(pruned_image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor, top_m: int,
                     chunk_size: int = 1024) -> Shortlists:
    """Each caption's top M gallery images under the pruned image encoder.

    The order is the one `retrieval_recall` implies: ties and NaN scores count against the caption,
    so its own image comes after every wrong image scoring at least as high (a NaN score of its own
    image puts it last); among wrong images, ties go to the lower index.

    Args:
        pruned_image_embeds: The pruned model's image embeddings, shape [N_img, E].
        text_embeds: Caption embeddings, shape [N_txt, E].
        text_to_image: Index of each caption's image, shape [N_txt], integer.
        top_m: M, images re-ranked per caption (>= 1; more than N_img means all of them).
        chunk_size: Captions scored per matrix product.

    Raises:
        ValueError: If shapes disagree, an index is out of range, or `top_m` is not positive.
    """
    check_top_m([top_m])
    check_retrieval_inputs(pruned_image_embeds, text_embeds, text_to_image, (1,), chunk_size, "shortlist_images")
    images = F.normalize(pruned_image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    text_to_image = text_to_image.to(device=images.device, dtype=torch.long)
    num_images = images.shape[0]
    width = min(top_m, num_images)
    chosen, ranks = [], []
    for start in range(0, texts.shape[0], chunk_size):
        scores = texts[start : start + chunk_size] @ images.T  # [chunk, N_img]
        own = text_to_image[start : start + chunk_size, None]
        own_score = scores.gather(1, own)
        rank = ((nan_first(scores) >= own_score).sum(dim=1) - 1).masked_fill(own_score[:, 0].isnan(), num_images)
        # nan_first leaves every score finite or +inf, so the own image (-inf) sorts after all wrong ones.
        wrong = nan_first(scores).scatter(1, own, -math.inf)
        best_wrong = wrong.sort(dim=1, descending=True, stable=True).indices[:, :width]
        made_cut = rank.clamp(max=num_images - 1) < width
        with_own = torch.cat([own, best_wrong[:, : width - 1]], dim=1)
        chosen.append(torch.where(made_cut[:, None], with_own, best_wrong))
        ranks.append(rank)
    return Shortlists(top_m, torch.cat(chosen), torch.cat(ranks), num_images)


@torch.no_grad()
def cascade_recall(dense_image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor, shortlists: Shortlists,
                   ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Text-to-image recall@k of the cascade: the shortlisted images re-ranked by the dense model's scores.

    A caption whose image made its top M is ranked among those M by the dense model (ties and NaN
    against it, as in `retrieval_recall`); one whose image did not keeps its pruned rank, since the
    M re-ranked images still come first. So with M >= N_img the result is the dense model's recall,
    and recall@1 with M = 1 is the pruned model's.

    Args:
        dense_image_embeds: The dense model's image embeddings, shape [N_img, E]; only the rows of
            `shortlists.reranked_images()` are read (the others may hold anything, e.g. NaN).
        text_embeds: Caption embeddings, shape [N_txt, E].
        text_to_image: Index of each caption's image, shape [N_txt], integer.
        shortlists: The first stage's top-M lists (`shortlist_images`) for the same captions.
        ks: Cut-offs k at which to report recall.
        chunk_size: Captions scored per matrix product.

    Returns:
        ``{"t2i_R@k": ...}`` for each k in ``ks``, in percent (0-100).
    """
    check_retrieval_inputs(dense_image_embeds, text_embeds, text_to_image, ks, chunk_size, "cascade_recall")
    if shortlists.images.shape[0] != text_embeds.shape[0] or shortlists.num_images != dense_image_embeds.shape[0]:
        raise ValueError(
            f"cascade_recall: the shortlists were made for {shortlists.images.shape[0]} captions and "
            f"{shortlists.num_images} images, got {text_embeds.shape[0]} and {dense_image_embeds.shape[0]}"
        )
    images = F.normalize(dense_image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    text_to_image = text_to_image.to(device=images.device, dtype=torch.long)
    candidates = shortlists.images.to(images.device)
    ranks = shortlists.first_stage_ranks.to(images.device).clone()
    for start in range(0, texts.shape[0], chunk_size):
        stop = start + chunk_size
        listed = candidates[start:stop]  # [chunk, M]
        own = text_to_image[start:stop, None]
        # The same product as retrieval_recall's, so that scores (and ties) agree bit for bit with it.
        all_scores = texts[start:stop] @ images.T  # [chunk, N_img], NaN in rows never encoded
        scores, own_score = all_scores.gather(1, listed), all_scores.gather(1, own)
        reranked = ((nan_first(scores) >= own_score) & (listed != own)).sum(dim=1)
        reranked = reranked.masked_fill(own_score[:, 0].isnan(), shortlists.num_images)
        made_cut = (listed == own).any(dim=1)
        ranks[start:stop] = torch.where(made_cut, reranked, ranks[start:stop])
    return {f"t2i_R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def union_growth(shortlists: Shortlists, order: Tensor) -> Tensor:
    """[N_txt] distinct images the dense model has encoded after each query, the captions asked in `order`.

    A search service answers queries one by one and keeps the dense embeddings it has computed, so
    an image re-ranked for an earlier query costs nothing later.

    Args:
        shortlists: The first stage's top-M lists.
        order: A permutation of the caption indices, shape [N_txt].
    """
    lists = shortlists.images.cpu()[order.cpu()]  # [N_txt, M'] in query order
    num_queries, width = lists.shape
    first_query = torch.full((shortlists.num_images,), num_queries, dtype=torch.long)
    asked_at = torch.arange(num_queries).repeat_interleave(width)
    first_query.scatter_reduce_(0, lists.flatten(), asked_at, reduce="amin")
    return torch.bincount(first_query[first_query < num_queries], minlength=num_queries).cumsum(0)


@dataclass(frozen=True)
class CascadeMacs:
    """Encoder MACs to search a gallery with the dense model alone and with the cascade (`cascade_macs`)."""

    dense: int
    cascade: int
    queries: int
    break_even_queries: int
    """How many of the queries (in a random order) the cascade serves with fewer MACs than the dense model."""

    @property
    def ratio(self) -> float:
        return self.cascade / self.dense

    def to_json(self) -> dict[str, Any]:
        return {"dense": self.dense, "cascade": self.cascade, "ratio": self.ratio, "queries": self.queries,
                "break_even_queries": self.break_even_queries, "unit": "encoder MACs (analytic) to encode the gallery"}


@dataclass(frozen=True)
class CascadeSeconds:
    """Seconds of image-encoder forward passes to search a gallery: the dense model alone against the cascade (the
    pruned model over every image, then the dense one over the re-ranked images)."""

    dense: float
    first_stage: float
    reranking: float
    device: str
    batch: int

    @property
    def cascade(self) -> float:
        return self.first_stage + self.reranking

    @property
    def speedup(self) -> float:
        return self.dense / self.cascade

    def to_json(self) -> dict[str, Any]:
        return {"dense": self.dense, "cascade": self.cascade, "first_stage": self.first_stage,
                "reranking": self.reranking, "speedup": self.speedup, "device": self.device, "batch": self.batch,
                "unit": "image-encoder forward passes only (no image decoding)"}


@dataclass(frozen=True)
class CascadeResult:
    """The cascade that re-ranks each caption's top M: its text-to-image recall (percent) and what it costs."""

    top_m: int
    retrieval: dict[str, float]
    images: int
    reranked_images: int
    """Distinct images of the top-M lists, which the dense model encodes."""
    macs: CascadeMacs
    seconds: CascadeSeconds

    def to_json(self) -> dict[str, Any]:
        return {"top_m": self.top_m, "retrieval": self.retrieval, "images": self.images,
                "reranked_images": self.reranked_images, "macs": self.macs.to_json(), "seconds": self.seconds.to_json()}


def cascade_macs(shortlists: Shortlists, dense_per_image: int, pruned_per_image: int,
                 seed: int = 0) -> CascadeMacs:
    """Encoder MACs to search the gallery: the dense model alone vs the cascade, from the actual top-M lists.

    The cascade encodes every image with the pruned model and the distinct images of the top-M
    lists with the dense one; caption encodings and similarity products are the same for both and
    left out. With many queries their lists cover the whole gallery, so `break_even_queries` also
    says for how many queries (asked in a random order drawn with `seed`) the cascade still needs
    fewer MACs than encoding the gallery densely.
    """
    num_images, num_queries = shortlists.num_images, shortlists.images.shape[0]
    reranked = len(shortlists.reranked_images())
    dense = num_images * dense_per_image
    cascade = num_images * pruned_per_image + reranked * dense_per_image
    order = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed))
    below = num_images * pruned_per_image + union_growth(shortlists, order) * dense_per_image < dense
    return CascadeMacs(dense, cascade, num_queries, int(below.sum()))
