"""Data: COCO-captions files and splits, image decoding, the synthetic demo set, a word tokenizer (no Lightning)."""

from clip_prune.data.coco import read_coco_captions
from clip_prune.data.synthetic import caption_vocabulary, write_synthetic_coco
from clip_prune.data.tokenizer import build_word_tokenizer

__all__ = ["build_word_tokenizer", "caption_vocabulary", "read_coco_captions", "write_synthetic_coco"]
