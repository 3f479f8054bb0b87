"""One prompt template for SFT training and for generation-based evaluation (`task.template`), so the model is
evaluated on the prompt format it was trained on.

- `alpaca`: the Alpaca / LLM-Adapters template the papers' commonsense and code runs use.
- `metamath`: MetaMath's (meta-math/MetaMath). Training (train_math.py) ends the prompt "### Response:" and appends
  the response right after it; a multi-line query is split at its first newline into instruction and input (the
  with-input prompt). Evaluation (eval_gsm8k.py, eval_math.py) ends it "### Response: Let's think step by step."
- `none`: the instruction as is.
- `chat`: the tokenizer's own chat template (one user turn, generation prompt added).

`stage` picks the training (`train`, the default) or the evaluation (`eval`) prompt; only `metamath` differs.
"""

from __future__ import annotations

from typing import Any

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# MetaMath's train_math.py PROMPT_DICT: Alpaca's text with no newline or space after "### Response:"
METAMATH_TRAIN = ALPACA.removesuffix("\n")
METAMATH_TRAIN_INPUT = ALPACA_INPUT.removesuffix("\n")
# MetaMath's eval_gsm8k.py / eval_math.py problem_prompt; its response line is reused for later turns (MT-Bench)
METAMATH_EVAL_RESPONSE = "### Response: Let's think step by step."
METAMATH_EVAL = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n" + METAMATH_EVAL_RESPONSE
)
TEMPLATES = ("alpaca", "metamath", "none", "chat")
STAGES = ("train", "eval")


def _metamath(instruction: str, input: str | None, stage: str) -> str:
    """MetaMath's training prompt (a query's first line as instruction, the rest as input) or its evaluation prompt
    (the whole query; an explicit input rejoined below the instruction, as in a MetaMathQA query)."""
    if stage == "eval":
        return METAMATH_EVAL.format(instruction=instruction if not input else f"{instruction}\n{input}")
    if not input and "\n" in instruction:  # train_math.py on {query, response} rows
        instruction, input = instruction.split("\n", 1)
    if input:
        return METAMATH_TRAIN_INPUT.format(instruction=instruction, input=input)
    return METAMATH_TRAIN.format(instruction=instruction)


def render_prompt(
    template: str | None, instruction: str, input: str | None = None, tokenizer: Any = None, stage: str = "train"
) -> str:
    """The prompt for `instruction` (and an optional `input`) in the named template, for training (`stage="train"`)
    or for generation at evaluation time (`stage="eval"`)."""
    if stage not in STAGES:
        raise ValueError(f"render_prompt: stage={stage!r} is unknown; allowed: {list(STAGES)}")
    name = template or "none"
    if name == "none":
        return instruction if not input else f"{instruction}\n\n{input}"
    if name == "alpaca":
        return (
            ALPACA_INPUT.format(instruction=instruction, input=input)
            if input
            else ALPACA.format(instruction=instruction)
        )
    if name == "metamath":
        return _metamath(instruction, input, stage)
    if name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("task.template=chat needs a tokenizer with a chat template")
        content = instruction if not input else f"{instruction}\n\n{input}"
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"task.template={template!r} is unknown; allowed: {list(TEMPLATES)}")
