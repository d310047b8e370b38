"""The pruned-then-dense cascade: its recall at the extremes of M and its cost from the actual top-M lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clip_prune.core.run.cascade import cascade_macs, cascade_recall, shortlist_images, union_growth
from clip_prune.core.run.metrics import retrieval_recall
from clip_prune.lightning.cli import main


def gallery(seed: int, num_images: int = 13, captions_per_image: int = 3, dim: int = 7):
    """Random dense embeddings, a noisy 'pruned' copy and captions near their images (odd sizes on purpose)."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(num_images, dim, generator=generator)
    pruned = dense + 0.8 * torch.randn(num_images, dim, generator=generator)
    text_to_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    texts = dense[text_to_image] + 1.2 * torch.randn(len(text_to_image), dim, generator=generator)
    return dense, pruned, texts, text_to_image


def cascade(dense, pruned, texts, text_to_image, top_m, chunk_size=1024):
    lists = shortlist_images(pruned, texts, text_to_image, top_m, chunk_size=chunk_size)
    return cascade_recall(dense, texts, text_to_image, lists, chunk_size=chunk_size), lists


@pytest.mark.parametrize("seed", range(5))
def test_top_m_at_least_the_gallery_gives_dense_recall_exactly(seed) -> None:
    dense, pruned, texts, text_to_image = gallery(seed)
    expected = {key: value for key, value in retrieval_recall(dense, texts, text_to_image).items() if "t2i" in key}
    for top_m in (13, 14, 1000):
        recall, lists = cascade(dense, pruned, texts, text_to_image, top_m)
        assert recall == expected
        assert lists.reranked_images().tolist() == list(range(13))


@pytest.mark.parametrize("seed", range(5))
def test_top_1_gives_pruned_recall_at_1_and_never_worse_at_larger_k(seed) -> None:
    dense, pruned, texts, text_to_image = gallery(seed)
    pruned_recall = retrieval_recall(pruned, texts, text_to_image)
    recall, _ = cascade(dense, pruned, texts, text_to_image, 1)
    assert recall["t2i_R@1"] == pruned_recall["t2i_R@1"]
    # With M = 1 nothing moves: the order is the pruned model's at every k.
    assert recall == {key: value for key, value in pruned_recall.items() if "t2i" in key}


def test_recall_at_m_is_the_first_stage_s_and_chunking_changes_nothing() -> None:
    dense, pruned, texts, text_to_image = gallery(0, num_images=40, captions_per_image=2, dim=5)
    recall, _ = cascade(dense, pruned, texts, text_to_image, 10, chunk_size=7)
    alone = retrieval_recall(pruned, texts, text_to_image)
    # Re-ranking reorders the top 10 only: whether a caption's image is among them is the first stage's call.
    assert recall["t2i_R@10"] == alone["t2i_R@10"]
    assert recall["t2i_R@1"] >= alone["t2i_R@1"]
    for chunk in (1, 3, 80):
        assert cascade(dense, pruned, texts, text_to_image, 10, chunk_size=chunk)[0] == recall


def planted():
    """Four images on the axes of R^4 and four captions whose rankings are worked out by hand.

    The pruned model swaps images 0 and 1 and collapses image 2 onto image 3 (exact ties).
    Pruned order per caption (own image in brackets): c0: 1 [0] 2=3; c1: 0 [1] 2=3;
    c2: 3=[2] (tie, against it); c3: 0=2=[3] then 1 (three-way tie: rank 2).
    """
    dense = torch.eye(4)
    pruned = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]])
    texts = torch.tensor([[1.0, 0.5, 0, 0], [0.3, 1, 0, 0.2], [0, 0, 1, 0.5], [0.2, 1, 0, 1]])
    return dense, pruned, texts, torch.tensor([0, 1, 2, 3])


def test_planted_shortlists_recall_and_macs_by_hand() -> None:
    dense, pruned, texts, text_to_image = planted()
    assert retrieval_recall(pruned, texts, text_to_image)["t2i_R@1"] == 0.0

    top_1 = shortlist_images(pruned, texts, text_to_image, 1)
    assert top_1.first_stage_ranks.tolist() == [1, 1, 1, 2]
    assert top_1.images.tolist() == [[1], [0], [3], [0]]  # c3: images 0 and 2 tie, the lower index goes first
    assert top_1.reranked_images().tolist() == [0, 1, 3]  # image 2 needs no dense encoding
    macs = cascade_macs(top_1, dense_per_image=100, pruned_per_image=30)
    assert (macs.dense, macs.cascade, macs.ratio, macs.queries) == (400, 4 * 30 + 3 * 100, 420 / 400, 4)
    # Asked one by one, the queries need 1, 2, 3, 3 dense encodings in all; 4·30 + n·100 < 400 holds for n <= 2.
    assert union_growth(top_1, torch.arange(4)).tolist() == [1, 2, 3, 3]
    assert union_growth(top_1, torch.tensor([3, 1, 0, 2])).tolist() == [1, 1, 2, 3]
    assert macs.break_even_queries == (union_growth(top_1, torch.randperm(4, generator=torch.Generator()
                                                                              .manual_seed(0))) <= 2).sum()

    top_2 = shortlist_images(pruned, texts, text_to_image, 2)
    assert [sorted(row) for row in top_2.images.tolist()] == [[0, 1], [0, 1], [2, 3], [0, 2]]
    # c0-c2: their image is in the top 2 and the dense model ranks it first; c3 keeps its pruned rank 2.
    assert cascade_recall(dense, texts, text_to_image, top_2) == {"t2i_R@1": 75.0, "t2i_R@5": 100.0,
                                                                   "t2i_R@10": 100.0}
    top_3 = shortlist_images(pruned, texts, text_to_image, 3)
    assert sorted(top_3.images[3].tolist()) == [0, 2, 3]
    assert cascade_recall(dense, texts, text_to_image, top_3)["t2i_R@1"] == 100.0


def test_rows_outside_the_top_m_lists_are_never_read() -> None:
    dense, pruned, texts, text_to_image = planted()
    top_1 = shortlist_images(pruned, texts, text_to_image, 1)
    sparse = dense.clone()
    sparse[2] = float("nan")  # image 2 is in no top-1 list (see the planted test)
    assert cascade_recall(sparse, texts, text_to_image, top_1) == cascade_recall(dense, texts, text_to_image, top_1)


def test_ties_and_nan_count_against_the_caption() -> None:
    texts, text_to_image = torch.eye(3), torch.arange(3)
    collapsed = torch.ones(3, 3)  # every image scores the same: each caption's image comes last
    lists = shortlist_images(collapsed, texts, text_to_image, 2)
    assert lists.first_stage_ranks.tolist() == [2, 2, 2]
    assert lists.images.tolist() == [[1, 2], [0, 2], [0, 1]]  # ties among wrong images go to the lower index
    assert cascade_recall(torch.eye(3), texts, text_to_image, lists, ks=(2,)) == {"t2i_R@2": 0.0}
    nan_pruned = torch.eye(3)
    nan_pruned[0] = float("nan")
    lists = shortlist_images(nan_pruned, texts, text_to_image, 3)
    assert lists.first_stage_ranks.tolist() == [3, 1, 1]  # image 0's NaN: a miss for its caption, first for others
    assert cascade_recall(torch.eye(3), texts, text_to_image, lists)["t2i_R@1"] == 100.0  # M = N: dense decides
    nan_dense = torch.eye(3)
    nan_dense[1] = float("nan")
    assert cascade_recall(nan_dense, texts, text_to_image, lists, ks=(3,))["t2i_R@3"] == pytest.approx(200 / 3)


def test_bad_top_m_and_mismatched_shortlists_are_refused() -> None:
    dense, pruned, texts, text_to_image = gallery(0)
    with pytest.raises(ValueError, match="--cascade_top_m values must be positive"):
        shortlist_images(pruned, texts, text_to_image, 0)
    with pytest.raises(ValueError, match=r"shortlist_images: images \[12\] have no caption"):
        shortlist_images(pruned, texts, text_to_image.clamp(max=11), 3)
    lists = shortlist_images(pruned, texts, text_to_image, 3)
    with pytest.raises(ValueError, match="made for 39 captions and 13 images"):
        cascade_recall(dense[:12], texts, text_to_image.clamp(max=11), lists)


CONFIG = Path(__file__).parents[3] / "configs" / "tiny.yaml"


def test_prune_and_evaluate_report_the_cascade(tiny_clip_dir, tiny_coco_root, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    main(["prune", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir), "--data.root",
          str(tiny_coco_root), "--output_dir", str(out), "--constraint", "0.5", "--cascade_top_m", "[100, 1, 3]"])
    assert "M=3 t2i_R@5 (%)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    dense = {key: value for key, value in metrics["dense"]["retrieval"].items() if "t2i" in key}
    top_1, top_3, top_100 = metrics["cascade"]
    assert [top_1["top_m"], top_3["top_m"], top_100["top_m"]] == [1, 3, 100]  # M = 100 re-ranks all 6 val images
    assert top_100["retrieval"] == dense and top_100["reranked_images"] == 6
    assert top_1["retrieval"]["t2i_R@1"] == metrics["pruned"]["retrieval"]["t2i_R@1"]
    for entry in (top_1, top_3, top_100):
        assert entry["images"] == 6 and 1 <= entry["reranked_images"] <= 6
        assert entry["macs"]["dense"] == 6 * report["macs"]["dense"] and entry["macs"]["queries"] == 12
        assert 0 <= entry["macs"]["break_even_queries"] <= 12
        assert entry["macs"]["cascade"] == 6 * report["macs"]["pruned"] + entry["reranked_images"] * report[
            "macs"]["dense"]
        seconds = entry["seconds"]
        assert seconds["cascade"] == pytest.approx(seconds["first_stage"] + seconds["reranking"])
        assert seconds["speedup"] == pytest.approx(seconds["dense"] / seconds["cascade"]) and seconds["device"] == "cpu"
    events = EventAccumulator(str(next((tmp_path / "lightning_logs").glob("version_*")))).Reload().Tags()
    assert {"cascade/t2i_R@1_by_top_m", "cascade/speedup_by_top_m"} <= set(events["scalars"])

    main(["evaluate", "--model.pretrained", str(tiny_clip_dir), "--data.root", str(tiny_coco_root),
          "--data.num_workers", "0", "--pruned", str(out / "pruned"), "--cascade_top_m", "[3]",
          "--output_json", str(tmp_path / "metrics.json")])
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    assert [entry["top_m"] for entry in evaluated["cascade"]] == [3]
    assert evaluated["cascade"][0]["retrieval"] == top_3["retrieval"]
    assert evaluated["cascade"][0]["reranked_images"] == top_3["reranked_images"]
    main(["apply", "--model.pretrained", str(tiny_clip_dir), "--data.root", str(tiny_coco_root), "--data.num_workers",
          "0", "--masks", str(out), "--output_dir", str(tmp_path / "applied"), "--latency_repeats", "1",
          "--cascade_top_m", "[3]"])
    applied = json.loads((tmp_path / "applied" / "report.json").read_text())["metrics"]["cascade"]
    assert applied[0]["retrieval"] == top_3["retrieval"]


def test_cascade_settings_are_refused_before_work(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"--cascade_top_m values must be positive integers .* got \[0\]"):
        main(["prune", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir), "--data.root",
              str(tiny_coco_root), "--output_dir", str(tmp_path / "run"), "--cascade_top_m", "[0, 5]"])
    with pytest.raises(ValueError, match="--cascade_top_m needs the saved pruned model"):
        main(["prune", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir), "--data.root",
              str(tiny_coco_root), "--output_dir", str(tmp_path / "run"), "--cascade_top_m", "[5]",
              "--options.save", "false"])
    with pytest.raises(ValueError, match="pass --pruned DIR"):
        main(["evaluate", "--model.pretrained", str(tiny_clip_dir), "--data.root", str(tiny_coco_root),
              "--cascade_top_m", "[5]"])
    assert not (tmp_path / "run").exists()
