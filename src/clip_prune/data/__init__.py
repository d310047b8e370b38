"""Data: COCO-captions calibration and evaluation splits, the synthetic demo set, a small word tokenizer."""

from clip_prune.data.coco import CocoDataModule, read_coco_captions
from clip_prune.data.synthetic import caption_vocabulary, write_synthetic_coco
from clip_prune.data.tokenizer import build_word_tokenizer

__all__ = ["CocoDataModule", "build_word_tokenizer", "caption_vocabulary", "read_coco_captions", "write_synthetic_coco"]
