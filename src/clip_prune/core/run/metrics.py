"""Image-text retrieval recall@k and zero-shot classification accuracy from CLIP embeddings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

METRIC_NAMES = frozenset(
    [f"retrieval/{direction}_R@{k}" for direction in ("i2t", "t2i") for k in (1, 5, 10)]
    + ["zero_shot/top1", "zero_shot/top5"]
)
"""`task/name` of every metric the evaluation reports (zero_shot/top5 only with more than 5 classes)."""


def nan_first(scores: Tensor) -> Tensor:
    """Scores with NaN as +inf, so that a NaN candidate ranks before the correct one."""
    return scores.nan_to_num(nan=math.inf, posinf=math.inf)


def _check_ks(ks: Sequence[int]) -> list[str]:
    return [f"ks={tuple(ks)} must hold positive integers"] if not ks or min(ks) < 1 else []


def check_retrieval_inputs(
    image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor, ks: Sequence[int], chunk_size: int,
    caller: str = "retrieval_recall",
) -> None:
    """Raise one ValueError, prefixed with `caller`, that lists every problem with the retrieval inputs."""
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    problems = _check_ks(ks)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        problems.append(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} "
            "must be [N_img, E] and [N_txt, E] with the same E"
        )
    if text_to_image.shape != (num_texts,) or text_to_image.dtype.is_floating_point:
        got = f"{text_to_image.dtype} {tuple(text_to_image.shape)}"
        problems.append(f"text_to_image must be an integer tensor of shape [{num_texts}], got {got}")
    elif num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        problems.append(f"text_to_image values must lie in [0, {num_images}) (the image indices)")
    else:
        missing = torch.bincount(text_to_image, minlength=num_images).eq(0).nonzero().flatten()
        if missing.numel():
            problems.append(f"images {missing[:10].tolist()} have no caption in text_to_image")
    if chunk_size < 1:
        problems.append(f"chunk_size={chunk_size} must be >= 1")
    if problems:
        raise ValueError(f"{caller}: " + "; ".join(problems))


def _image_to_text_ranks(images: Tensor, texts: Tensor, text_to_image: Tensor, chunk_size: int) -> Tensor:
    """Per image [N_img]: wrong captions scoring at least its best caption (N_txt if NaN)."""
    ranks = torch.empty(images.shape[0], dtype=torch.long, device=images.device)
    for start in range(0, images.shape[0], chunk_size):
        scores = images[start : start + chunk_size] @ texts.T  # [chunk, N_txt]
        query = torch.arange(start, start + scores.shape[0], device=images.device)
        positive = text_to_image[None, :] == query[:, None]
        best = scores.masked_fill(~positive, -math.inf).amax(dim=1, keepdim=True)
        rank = ((nan_first(scores) >= best) & ~positive).sum(dim=1)
        ranks[start : start + scores.shape[0]] = rank.masked_fill(best[:, 0].isnan(), texts.shape[0])
    return ranks


def _text_to_image_ranks(images: Tensor, texts: Tensor, text_to_image: Tensor, chunk_size: int) -> Tensor:
    """Per caption [N_txt]: wrong images scoring at least its own image (N_img if NaN)."""
    ranks = torch.empty(texts.shape[0], dtype=torch.long, device=images.device)
    for start in range(0, texts.shape[0], chunk_size):
        scores = texts[start : start + chunk_size] @ images.T  # [chunk, N_img]
        target = scores.gather(1, text_to_image[start : start + chunk_size, None])
        rank = (nan_first(scores) >= target).sum(dim=1) - 1
        ranks[start : start + scores.shape[0]] = rank.masked_fill(target[:, 0].isnan(), images.shape[0])
    return ranks


@torch.no_grad()
def retrieval_recall(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k under the COCO 5k protocol (Karpathy test split).

    Embeddings are L2-normalised and compared by cosine similarity. An image is a hit at k if any
    of its captions is among the k texts most similar to it; a caption is a hit at k if its image
    is among the k most similar images. Ties count against the query: a candidate that scores the
    same as the best correct one ranks before it, so a collapsed model (all embeddings equal)
    scores near 0, not 100. Likewise a NaN score ranks first as a wrong candidate and is a miss
    as the correct one.

    Plain torch, not torchmetrics' ``RetrievalRecall``: that one reports the fraction of relevant
    items retrieved (at most 1/5 at k=1 for an image with 5 captions), not "any caption", and
    takes the whole N_img x N_txt score matrix at once. Here queries are scored ``chunk_size`` at
    a time, so memory is ``chunk_size`` x max(N_img, N_txt) floats.

    Args:
        image_embeds: Image embeddings, shape [N_img, E].
        text_embeds: Caption embeddings, shape [N_txt, E].
        text_to_image: Index into ``image_embeds`` of each caption's image, shape [N_txt], integer.
            Every image needs at least one caption.
        ks: Cut-offs k at which to report recall.
        chunk_size: Queries scored per matrix product.

    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ...}`` for each k in ``ks``, in percent (0-100).

    Raises:
        ValueError: If shapes disagree, an index is out of range, an image has no caption,
            or ``ks``/``chunk_size`` are not positive.
    """
    check_retrieval_inputs(image_embeds, text_embeds, text_to_image, ks, chunk_size)
    images = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    text_to_image = text_to_image.to(device=images.device, dtype=torch.long)
    i2t = _image_to_text_ranks(images, texts, text_to_image, chunk_size)
    t2i = _text_to_image_ranks(images, texts, text_to_image, chunk_size)
    recall = {f"i2t_R@{k}": 100.0 * (i2t < k).double().mean().item() for k in ks}
    recall |= {f"t2i_R@{k}": 100.0 * (t2i < k).double().mean().item() for k in ks}
    return recall


@torch.no_grad()
def zero_shot_accuracy(image_embeds: Tensor, class_text_embeds: Tensor, labels: Tensor) -> dict[str, float]:
    """Zero-shot classification accuracy, with CLIP's prompt ensembling.

    Each prompt embedding is L2-normalised, the P prompts of a class are averaged and the mean is
    renormalised (Radford et al., arXiv 2103.00020); images are classified by cosine similarity.
    Ties and NaN scores count against the image, as in :func:`retrieval_recall`.

    Args:
        image_embeds: Image embeddings, shape [N, E].
        class_text_embeds: Prompt embeddings per class, shape [C, P, E], or [C, E] for one prompt.
        labels: True class of each image, shape [N], integer in [0, C).

    Returns:
        ``{"top1": ...}``, plus ``"top5"`` when C > 5, in percent (0-100).

    Raises:
        ValueError: If shapes disagree or a label is out of range.
    """
    if class_text_embeds.ndim == 2:
        class_text_embeds = class_text_embeds[:, None]
    problems: list[str] = []
    if (
        image_embeds.ndim != 2
        or class_text_embeds.ndim != 3
        or image_embeds.shape[1] != class_text_embeds.shape[2]
    ):
        problems.append(
            f"image_embeds {tuple(image_embeds.shape)} and class_text_embeds "
            f"{tuple(class_text_embeds.shape)} must be [N, E] and [C, P, E] or [C, E] with the same E"
        )
    num_classes = class_text_embeds.shape[0]
    if labels.shape != image_embeds.shape[:1] or labels.dtype.is_floating_point:
        got = f"{labels.dtype} {tuple(labels.shape)}"
        problems.append(f"labels must be an integer tensor of shape [{image_embeds.shape[0]}], got {got}")
    elif labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        problems.append(f"labels must lie in [0, {num_classes}) (the classes of class_text_embeds)")
    if problems:
        raise ValueError("zero_shot_accuracy: " + "; ".join(problems))

    classes = F.normalize(F.normalize(class_text_embeds.float(), dim=-1).mean(dim=1), dim=-1)
    scores = F.normalize(image_embeds.float(), dim=-1) @ classes.to(image_embeds.device).T  # [N, C]
    target = scores.gather(1, labels.to(device=scores.device, dtype=torch.long)[:, None])
    rank = ((nan_first(scores) >= target).sum(dim=1) - 1).masked_fill(target[:, 0].isnan(), num_classes)
    accuracy = {"top1": 100.0 * (rank < 1).double().mean().item()}
    if num_classes > 5:  # with 5 classes or fewer, top-5 is always 100%
        accuracy["top5"] = 100.0 * (rank < 5).double().mean().item()
    return accuracy
