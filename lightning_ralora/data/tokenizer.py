"""Tokenizers: the model's own (`AutoTokenizer.from_pretrained`) or a built-in byte-level one for tiny models."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerFast

BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer (256 bytes + pad/bos/eos) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in BYTE_SPECIALS:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def load_tokenizer(name: str | None):
    """`bytes` (or null) gives the built-in byte tokenizer; anything else goes to AutoTokenizer.from_pretrained."""
    if name in (None, "bytes"):
        return byte_tokenizer()
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
