"""BOS handling of prompts in training (tasks/sft.py `encode_pair`) and generation (evaluation/generate.py): the
references tokenize with the tokenizer's defaults, so a LLaMA-3-style tokenizer (a TemplateProcessing post-processor
that puts BOS first) gives every prompt exactly one BOS; a chat template that writes the BOS itself gets no second
one; `task.add_special_tokens=false` restores the text-only ids; a T5-style tokenizer (EOS appended to every
encoding) gets no EOS inside the prompt.

The reference rules re-derived here:
- AGI-Edgerunners/LLM-Adapters finetune.py `generate_and_tokenize_prompt`: the prompt tokens are
  `tokenizer(user_prompt)` (defaults: BOS first), labels masked over their length, the full text ends with EOS.
- AGI-Edgerunners/LLM-Adapters commonsense_evaluate.py `evaluate`: `tokenizer(prompts, padding=True)` with
  `padding_side = "left"`, i.e. each prompt's ids are `tokenizer(prompt)` after the left padding.
- meta-math/MetaMath train_math.py `_tokenize_fn`: `tokenizer(text, ...)` with its defaults.
- transformers `apply_chat_template(tokenize=True)` encodes the rendered chat with `add_special_tokens=False`: the
  template's own BOS is the only one.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_ralora.data.templates import render_prompt
from lightning_ralora.data.tokenizer import byte_tokenizer, encode_prompt, special_affixes
from lightning_ralora.evaluation.generate import make_generate
from lightning_ralora.evaluation.runner import evaluate, prepare_training_eval
from lightning_ralora.tasks.sft import IGNORE, SFTTask, encode_pair
from tests.conftest import make_cfg
from tests.helpers import save_special_tokenizer


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    return save_special_tokenizer(tmp_path_factory.mktemp("llama3_tok"), "bos")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return save_special_tokenizer(tmp_path_factory.mktemp("t5_tok"), "eos")


@pytest.fixture(scope="module")
def tok(llama3_dir: Path):
    return AutoTokenizer.from_pretrained(llama3_dir)


def _task(tokenizer_dir: Path, **cfg) -> SFTTask:
    return SFTTask({"max_length": 256, "batch_size": 2, "template": "alpaca", **cfg}, {"tokenizer": str(tokenizer_dir)})


def test_the_tokenizer_under_test_adds_bos_like_llama3(tok) -> None:
    """The fixture is what the tests assume: its defaults put one BOS first, and the plain encoding has none."""
    bos = tok.bos_token_id
    assert tok("hi")["input_ids"] == [bos, *tok("hi", add_special_tokens=False)["input_ids"]]
    assert special_affixes(tok) == ([bos], [])


def test_training_ids_start_with_exactly_one_bos(llama3_dir: Path, tok) -> None:
    task = _task(llama3_dir)
    row = task.encode_row({"prompt": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is 5"})
    prompt = render_prompt("alpaca", "What is 2 + 3?")
    user = tok(prompt)["input_ids"]  # LLM-Adapters: tokenize(user_prompt) with the tokenizer's defaults
    response = tok("2 + 3 = 5. The answer is 5", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == user + response + [tok.eos_token_id]
    assert row["labels"] == [IGNORE] * len(user) + response + [tok.eos_token_id]
    assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"].count(tok.bos_token_id) == 1


def test_generation_prompt_ids_start_with_exactly_one_bos(tok) -> None:
    """The ids handed to `model.generate`, unpadded by their attention mask, are `tokenizer(prompt)` (LLM-Adapters'
    commonsense_evaluate.py), for every prompt of a left-padded batch."""
    model = _tiny_llama(tok)
    seen = _record_generate_inputs(model)
    prompts = ["Question: 1 + 1?\nAnswer:", "A much longer question about apples and pears?\nAnswer:"]
    make_generate(model, tok, batch_size=2, progress=False)(prompts, max_new_tokens=2)
    ((ids, mask),) = seen
    got = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    by_length = sorted(prompts, key=lambda p: -len(tok(p)["input_ids"]))  # the decoder batches longest first
    assert got == [tok(p)["input_ids"] for p in by_length]
    assert all(g[0] == tok.bos_token_id and g.count(tok.bos_token_id) == 1 for g in got)


def test_chat_template_prompts_get_one_bos_in_training_and_generation(llama3_dir: Path, tok) -> None:
    messages = [{"role": "user", "content": "Name a prime."}]
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert expected.count(tok.bos_token_id) == 1  # the template writes the BOS itself
    task = _task(llama3_dir, template="chat")
    row = task.encode_row({"prompt": "Name a prime.", "response": "7"})
    assert row["input_ids"][: len(expected)] == expected and row["input_ids"].count(tok.bos_token_id) == 1
    model = _tiny_llama(tok)
    seen = _record_generate_inputs(model)
    rendered = render_prompt("chat", "Name a prime.", tokenizer=tok)
    make_generate(model, tok, batch_size=1, progress=False)([rendered], max_new_tokens=2)
    assert seen[0][0][0].tolist() == expected


def test_add_special_tokens_false_restores_the_text_only_ids(llama3_dir: Path, tok) -> None:
    prompt = render_prompt("alpaca", "What is 2 + 3?")
    row = _task(llama3_dir, add_special_tokens=False).encode_row({"prompt": "What is 2 + 3?", "response": "5"})
    plain = tok(prompt, add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == plain + tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.bos_token_id not in row["input_ids"]
    model = _tiny_llama(tok)
    seen = _record_generate_inputs(model)
    make_generate(model, tok, batch_size=1, progress=False, add_special_tokens=False)([prompt], max_new_tokens=2)
    assert seen[0][0][0].tolist() == plain


def test_t5_style_tokenizer_gets_no_eos_inside_the_prompt(t5_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(t5_dir)
    eos = tok.eos_token_id
    assert tok("hi")["input_ids"][-1] == eos  # the tokenizer appends EOS to every encoding
    row = _task(t5_dir, template="none").encode_row({"prompt": "2+3=", "response": "5"})
    assert row["input_ids"] == tok("2+3=", add_special_tokens=False)["input_ids"] + tok("5")["input_ids"]
    assert row["input_ids"].count(eos) == 1 and row["input_ids"][-1] == eos
    assert encode_prompt(tok, "2+3=") == tok("2+3=")["input_ids"][:-1]


def test_truncation_keeps_the_bos_and_the_prompt_end(tok) -> None:
    prompt, response = "x" * 40 + "### Response:\n", "answer"
    item = encode_pair(tok, prompt, response, max_length=16)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p_plain = tok(prompt, add_special_tokens=False)["input_ids"]
    budget = 16 - len(r_ids)  # the response (7 ids) fits in half of max_length: the prompt keeps 9, BOS first
    assert len(ids) == 16 and ids == [tok.bos_token_id] + p_plain[-(budget - 1) :] + r_ids
    assert labels[-len(r_ids) :] == r_ids and labels[:budget] == [IGNORE] * budget


def test_the_byte_tokenizer_is_unchanged() -> None:
    """It adds no special tokens by default: the ids are the text's, with either setting, as encode_pair gave
    before (`tokenizer(text, add_special_tokens=False)` for prompt and response, then EOS)."""
    tok = byte_tokenizer()
    assert special_affixes(tok) == ([], [])
    before = tok("2+3=", add_special_tokens=False)["input_ids"] + tok("5", add_special_tokens=False)["input_ids"]
    assert len(before) == 5  # one id per byte
    for special in (True, False):
        item = encode_pair(tok, "2+3=", "5", max_length=64, add_special_tokens=special)
        assert item["input_ids"].tolist() == before + [tok.eos_token_id]


def test_add_special_tokens_must_be_a_bool(llama3_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    cfg = {"data_files": str(data), "batch_size": 2, "template": "none", "add_special_tokens": "yes"}
    problems = SFTTask.validate(cfg, {"family": "causal_lm"})
    assert any(p.startswith("task.add_special_tokens='yes' must be true") for p in problems), problems


def test_the_runner_reads_add_special_tokens_from_the_run_config(tok, tmp_path: Path) -> None:
    """`evaluate` on a module whose task config says add_special_tokens=false generates from the text-only ids;
    with the key absent (the default, true) from `tokenizer(prompt)`."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "Tom has 2 apples. How many?", "answer": "#### 2"}) + "\n")
    model = _tiny_llama(tok)
    seen = _record_generate_inputs(model)
    eval_cfg = {"name": "gsm8k", "data_files": str(data), "max_new_tokens": 2}
    for cfg in ({"add_special_tokens": False}, {}):
        module = SimpleNamespace(backbone=model, task=SimpleNamespace(cfg=cfg, tokenizer=tok, seed=0))
        evaluate(module, eval_cfg, None, template="alpaca")
    prompt = render_prompt("alpaca", "Tom has 2 apples. How many?")
    assert [s[0][0].tolist() for s in seen] == [
        tok(prompt, add_special_tokens=False)["input_ids"],
        tok(prompt)["input_ids"],
    ]


def test_chat_template_prompts_reach_the_training_runs_evaluation(llama3_dir: Path, tok, tmp_path: Path) -> None:
    """task.template=chat: the evaluation prepared before training renders its prompts with the run's tokenizer
    (model.tokenizer), as the tokenizer's own `apply_chat_template` does."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "Tom has 2 apples. How many?", "answer": "#### 2"}) + "\n")
    overrides = ["task=sft", "task.template=chat", f"model.tokenizer={llama3_dir}", "eval=gsm8k"]
    (job,) = prepare_training_eval(make_cfg(tmp_path / "run", [*overrides, f"eval.data_files={data}"]))
    messages = [{"role": "user", "content": "Tom has 2 apples. How many?"}]
    assert job.examples[0].prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _tiny_llama(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _record_generate_inputs(model: LlamaForCausalLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wrap `model.generate` to record the (input_ids, attention_mask) of every call."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = model.generate

    def recording(*args, **kwargs):
        seen.append((kwargs["input_ids"].cpu(), kwargs["attention_mask"].cpu()))
        return original(*args, **kwargs)

    model.generate = recording
    return seen
