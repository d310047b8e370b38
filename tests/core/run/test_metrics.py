import math

import pytest
import torch

from clip_prune.core.run.metrics import retrieval_recall, zero_shot_accuracy

# Cosine similarity of image i (one-hot e_i) with caption t (unit vector) is column t's entry i:
# rows are images 0-2, columns captions 0-5, captions 2i and 2i+1 belong to image i.
SIMILARITY = torch.tensor(
    [
        [0.90, 0.30, 0.60, 0.20, 0.10, 0.50],
        [0.10, 0.55, 0.50, 0.52, 0.40, 0.12],
        [0.38, 0.40, 0.10, 0.30, 0.35, 0.15],
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])


def _hand_built_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.eye(3, 4) * torch.tensor([[2.0], [0.5], [7.0]])  # norms differ: must be normalised
    padding = (1 - SIMILARITY.pow(2).sum(0)).sqrt()
    texts = torch.cat([SIMILARITY, padding[None]]).T  # [6, 4], unit rows
    return images, texts


def test_retrieval_recall_hand_computed_ranks():
    images, texts = _hand_built_embeddings()
    recall = retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(1, 2, 3))
    # Image -> text: image 0's caption 0 is first; image 1's best caption (3, 0.52) trails caption 1
    # (0.55), although its other caption (2, 0.50) trails two; image 2's best (4, 0.35) trails 0 and 1.
    # Text -> image ranks of the true image: [0, 2, 1, 0, 1, 1].
    expected = {
        "i2t_R@1": 100 / 3,
        "i2t_R@2": 200 / 3,
        "i2t_R@3": 100.0,
        "t2i_R@1": 100 / 3,
        "t2i_R@2": 500 / 6,
        "t2i_R@3": 100.0,
    }
    assert recall.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(recall[key], value, abs_tol=1e-4), key


def test_retrieval_recall_counts_ties_against_the_query():
    images, texts = torch.ones(3, 4), torch.ones(6, 4)  # a collapsed model: every score ties
    recall = retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(1, 4, 5))
    # Image -> text: 4 wrong captions tie with the right ones; text -> image: 2 wrong images tie.
    assert recall == {
        "i2t_R@1": 0.0,
        "i2t_R@4": 0.0,
        "i2t_R@5": 100.0,
        "t2i_R@1": 0.0,
        "t2i_R@4": 100.0,
        "t2i_R@5": 100.0,
    }


def test_retrieval_recall_nan_is_a_miss():
    images, texts = _hand_built_embeddings()
    images[0] = float("nan")
    recall = retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(2,))
    # Image 0 misses; images 1 and 2 keep ranks 1 and 2. Captions 0 and 1 miss; for the others
    # image 0 now ranks first, pushing caption 4's image from rank 1 to 2.
    assert math.isclose(recall["i2t_R@2"], 100 / 3, abs_tol=1e-4)
    assert math.isclose(recall["t2i_R@2"], 50.0, abs_tol=1e-4)


def _reference_ranks(images, texts, text_to_image):
    """Independent path: full similarity matrix, argsort, position of the first correct item."""
    scores = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    i2t_order = scores.argsort(dim=1, descending=True)
    i2t = [(text_to_image[i2t_order[i]] == i).nonzero()[0, 0].item() for i in range(len(images))]
    t2i_order = scores.T.argsort(dim=1, descending=True)
    t2i = [(t2i_order[t] == text_to_image[t]).nonzero()[0, 0].item() for t in range(len(texts))]
    return torch.tensor(i2t), torch.tensor(t2i)


def test_retrieval_recall_chunked_matches_unchunked_and_reference():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(50, 16, generator=generator)
    text_to_image = torch.arange(50).repeat_interleave(5)[torch.randperm(250, generator=generator)]
    texts = images[text_to_image] + 3 * torch.randn(250, 16, generator=generator)
    ks = (1, 5, 10)
    whole = retrieval_recall(images, texts, text_to_image, ks=ks, chunk_size=10_000)
    chunked = retrieval_recall(images, texts, text_to_image, ks=ks, chunk_size=7)
    assert chunked == whole
    i2t, t2i = _reference_ranks(images, texts, text_to_image)
    for k in ks:
        assert math.isclose(whole[f"i2t_R@{k}"], 100 * (i2t < k).float().mean().item(), abs_tol=1e-4)
        assert math.isclose(whole[f"t2i_R@{k}"], 100 * (t2i < k).float().mean().item(), abs_tol=1e-4)
    assert 0 < whole["i2t_R@1"] < whole["i2t_R@10"] < 100  # the case is neither trivial nor hopeless


def test_retrieval_recall_rejects_bad_input():
    images, texts = _hand_built_embeddings()
    with pytest.raises(ValueError, match=r"images \[2\] have no caption"):
        retrieval_recall(images, texts, torch.tensor([0, 0, 1, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        retrieval_recall(images, texts, torch.tensor([0, 0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match="same E"):
        retrieval_recall(images[:, :3], texts, TEXT_TO_IMAGE)
    with pytest.raises(ValueError, match=r"ks=\(0, 1\) must hold positive"):
        retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(0, 1))


def _unit(degrees: float) -> torch.Tensor:
    radians = math.radians(degrees)
    return torch.tensor([math.cos(radians), math.sin(radians)])


def _class_prompts() -> torch.Tensor:
    """[6, 2, 2]: class 0's two prompts average to 45 degrees only if normalised first."""
    classes = [torch.stack([10 * _unit(0), _unit(90)])]
    classes += [torch.stack([2 * _unit(a), 0.5 * _unit(a)]) for a in (20, 90, 135, 180, 270)]
    return torch.stack(classes)


def test_zero_shot_accuracy_hand_built():
    # Image at 40 degrees, class 0 (45): first. At 100, class 3 (135): behind class 2 (90).
    # At 200, class 1 (20): the farthest of six classes, sixth. Raw averaging would put class 0
    # at 6 degrees and the first image's nearest class would become class 1 (20).
    images = torch.stack([3 * _unit(40), _unit(100), 0.2 * _unit(200)])
    labels = torch.tensor([0, 3, 1])
    accuracy = zero_shot_accuracy(images, _class_prompts(), labels)
    assert accuracy.keys() == {"top1", "top5"}
    assert math.isclose(accuracy["top1"], 100 / 3, abs_tol=1e-4)
    assert math.isclose(accuracy["top5"], 200 / 3, abs_tol=1e-4)


def test_zero_shot_accuracy_single_prompt_and_few_classes():
    classes = torch.stack([_unit(45), _unit(20), _unit(90)])  # [C, E] with C < 5: no top5
    images = torch.stack([_unit(40), _unit(100), _unit(200)])
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 2, 2])) == {"top1": 100.0}
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        zero_shot_accuracy(images, classes, torch.tensor([0, 2, 3]))
