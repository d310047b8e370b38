"""A word-level CLIP-style tokenizer for small vocabularies (tests and the built-in demo)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"


def build_word_tokenizer(words: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """Lower-cased whitespace/punctuation tokenizer over `words`, wrapping text in BOS … EOS as CLIP does.

    The special tokens take ids 0-3 (pad 0, unk 1, bos 2, eos 3); set the text config's
    `eos_token_id` to `tokenizer.eos_token_id` so CLIP pools the EOS position.
    """
    vocab = {token: index for index, token in enumerate((PAD, UNK, BOS, EOS))}
    for word in sorted({w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_length,
    )
