"""Tokenizers: the model's own (`AutoTokenizer.from_pretrained`) or a built-in byte-level one for tiny models, and
the prompt encoding that training (tasks/sft.py) and generation (evaluation/generate.py) share.

Prompts are encoded as the references do (MetaMath train_math.py, LLM-Adapters finetune.py and
commonsense_evaluate.py, FastChat gen_model_answer.py all call `tokenizer(text)` with its defaults): the ids the
tokenizer's defaults put BEFORE the text (LLaMA-3's and Gemma's BOS) come first. The ids they put AFTER it (a T5-style
post-processor's EOS, BERT's [SEP]) are left out: the response or the generation follows the prompt, and an
end-of-text id inside the prompt would tell a causal LM the text is over. A prompt whose own text already starts with
those ids (a chat template that writes "<|begin_of_text|>", which `apply_chat_template(tokenize=True)` encodes with
`add_special_tokens=False` for that reason) gets none added: never two BOS.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast

BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>")
_PROBE = "a"  # a text every tokenizer encodes to a non-empty id list, with and without its special tokens


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer (256 bytes + pad/bos/eos) that needs no download; it adds no special
    tokens by default (no post-processor), so its prompt encoding is the same with or without them."""
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


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer's defaults add before and after a text, found by encoding a probe
    text with and without them (LLaMA-3 / Gemma: [bos], []; T5: [], [eos]; BERT: [cls], [sep]; bytes: [], [])."""
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    # the text itself encodes differently with specials (not seen in practice): keep only a leading BOS
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None and full[:1] == [bos] else []), []


def starts_with_prefix(tokenizer: Any, text: str, ids: list[int], prefix: list[int]) -> bool:
    """Whether a prompt already carries the leading special ids (its text starts with the BOS text, or its plain
    encoding with the prefix ids), as a chat template's rendering does."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(prefix) and (ids[: len(prefix)] == prefix or (isinstance(bos, str) and text.startswith(bos)))


def encode_prompt(
    tokenizer: Any, text: str, add_special_tokens: bool = True, prefix: list[int] | None = None
) -> list[int]:
    """The ids of a prompt: the tokenizer's leading special ids (BOS where it adds one; none when the text already
    starts with them) + the text's ids; no trailing special ids. `add_special_tokens=False`: the text's ids only.
    `prefix` is `special_affixes(tokenizer)[0]` when the caller computed it already."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not add_special_tokens:
        return ids
    prefix = special_affixes(tokenizer)[0] if prefix is None else prefix
    return ids if not prefix or starts_with_prefix(tokenizer, text, ids, prefix) else prefix + ids
