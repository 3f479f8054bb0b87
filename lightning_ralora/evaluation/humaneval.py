"""HumanEval and HumanEval+ (functional correctness of generated Python functions), pass@1 greedy and pass@k.

Program assembly:
- completion mode (`mode="completion"`, default; base models): the prompt is the function signature + docstring; the
  program is prompt + completion cut at the first of `CODE_STOP` ("\\ndef ", "\\nclass ", "\\nif __name__",
  "\\nprint(", "\\n#"), human-eval's prompt + completion protocol.
- instruct mode (`mode="instruct"`): the prompt is `self.prompt(template, "Complete the following Python
  function:\\n" + prompt)`; the code of the answer is chosen by `extract` (`eval.extract`):
  - `reference` (default): EvalPlus's `sanitize` (github evalplus/evalplus, evalplus/sanitize.py, re-derived with
    Python's `ast` where EvalPlus walks a tree-sitter tree): the longest run of lines that parses as Python, of which
    the imports and the entry point with the top-level definitions it reaches are kept (test code, prints and
    `if __name__ == "__main__":` blocks are dropped). The program is the prompt's own top-level statements that this
    code does not define (its imports, helper functions such as HumanEval/10's `is_palindrome`, globals; never the
    entry point's stub), then the code: an answer that restates only the entry point still finds them.
  - `standalone`: EvalPlus's sanitized code alone, without the prompt's statements, exactly what EvalPlus executes
    for a chat model (evalplus/codegen.py: `solution = impl`; evaluate.py runs `solution`).
  - `lenient` (our earlier rule): the first fenced block (```python / ```py / ```) that defines the entry point, else
    the first fenced block, else the whole completion; when it defines the entry point it is the program (after the
    prompt's import lines), otherwise it is taken as the function body: prompt + code.
  `extract` does not apply to completion or synthesize mode.
- synthesize mode (`mode="synthesize"`): bigcode-evaluation-harness's `humanevalsynthesize-python` task with
  `--prompt alpaca-chat`, as GraLoRA's scripts/eval/llm.llama-3_1-8b+data.code.sh runs it (github SqueezeBits/GraLoRA,
  bigcode-evaluation-harness/bigcode_eval/tasks/humanevalpack.py). The prompt is `("Below is an instruction ...
  ### Instruction:\n" + instruction + "\n\n### Response:\n" + prompt).strip()` (the run's template is not used);
  `instruction` is the row's `instruction` field (HumanEvalPack's rows), else derived from the prompt as
  HumanEvalPack built it (github bigcode-project/octopack, evaluation/create/create_instructions.py
  `python_instruct`): "Write a Python function `{signature}` to solve the following problem:\n{docstring}".
  The generation is right-stripped, cut at the first of `SYNTHESIZE_STOP`, then cut before its first non-blank line
  that does not start with a space or tab (`remove_last_block`); the program is prompt.rstrip() + generation.
  Defaults are the paper's run: n = 50 samples at temperature 0.2, top_p 0.95, pass@{1, 5, 10}, a 20 s timeout
  (humanevalplus.py's), and 1024 new tokens (the reference caps prompt + generation at 2048 tokens).
The program run is program + "\\n" + test + f"\\ncheck({entry_point})\\n" in the sandbox (`sandbox.execute_programs`),
whose harness makes the `check(entry_point)` call itself as its last step. `eval.sandbox` picks the sandbox: `bwrap`
(the default, OS isolation; refused before any model loads where it cannot run) or `guard` (the weaker in-process
guard, an explicit opt-in); docs/sandbox.md. The mode used is in every record and in the metrics (`"sandbox"`, so in
eval.json).

HumanEval+ is supported in the `test` field form (the hub's `evalplus/humanevalplus`, whose `test` holds the plus
tests as a `check(candidate)` function); EvalPlus's raw jsonl with only `base_input`/`plus_input` is not executed here.
"""

from __future__ import annotations

import ast
import itertools
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lightning_ralora.evaluation.base import (
    EvalDataError,
    Example,
    GenerateFn,
    GenerationSuite,
    HubSource,
    register_suite,
)
from lightning_ralora.evaluation.gsm8k import TEXT_STOP, check_extract
from lightning_ralora.evaluation.sandbox import check_sandbox, execute_programs

CODE_STOP: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
INSTRUCTION = "Complete the following Python function:\n"
MODES: tuple[str, ...] = ("completion", "instruct", "synthesize")
# humanevalpack.py: LANGUAGE_TO_STOP_WORDS["python"] plus the two end tokens every HumanEvalPack task appends
SYNTHESIZE_STOP: tuple[str, ...] = (
    "\nclass",
    "\ndef",
    "\n#",
    "\n@",
    "\nprint",
    "\nif",
    "\nassert",
    "<|endoftext|>",
    "<|eot_id|>",
)
# humanevalpack.py `get_prompt`, the `alpaca-chat` (= `wizardcoder`) prompt, around the instruction
SYNTHESIZE_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n"
)
SYNTHESIZE_RESPONSE = "\n\n### Response:\n"
# the reference's decoding and scoring for synthesize mode: n, temperature, pass@k, timeout (s), new tokens
SYNTHESIZE_DEFAULTS: dict[str, Any] = {"samples": 50, "temperature": 0.2, "k": (1, 5, 10), "timeout_s": 20.0}
SYNTHESIZE_MAX_NEW_TOKENS = 1024
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_IMPORT = re.compile(r"^(?:import |from \S+ import )")
EXTRACT_RULES: tuple[str, ...] = ("reference", "standalone", "lenient")
_ANSI = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")  # ANSI escapes, removed first by EvalPlus
# fields of ast nodes that hold identifiers (tree-sitter `identifier` leaves): names, attributes, parameters,
# keyword arguments, definition names, imported (dotted) names, global/nonlocal names, match captures
_IDENTIFIER_FIELDS = ("id", "attr", "arg", "name", "asname", "module", "rest", "names", "kwd_attrs")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or k < 1 or n < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, n >= 1, k >= 1 (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def truncate_at_stop(text: str, stops: Sequence[str] = CODE_STOP) -> str:
    """`text` cut at the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The `lenient` rule's code of an instruct-mode completion: the fenced block defining `entry_point`, else the
    first fenced block, else the completion itself."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    if entry_point:
        for block in blocks:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", block, re.MULTILINE):
                return block
    return blocks[0]


def _parses(code: str) -> bool:
    """Whether `code` is valid Python: EvalPlus's `syntax_check` (evalplus/syncheck.py), `ast.parse` succeeds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning on invalid escapes in model code
        try:
            ast.parse(code)
        except (SyntaxError, MemoryError, ValueError, RecursionError):
            return False
    return True


def longest_code_span(text: str) -> str:
    """EvalPlus's `code_extract`: after removing ANSI escapes, the run of two or more consecutive lines that parses
    as Python and has the most non-blank lines (the first such run on ties); the first line when there is none."""
    lines = _ANSI.sub("", text).split("\n")
    n = len(lines)
    nonblank = list(itertools.accumulate((1 if line.strip() else 0 for line in lines), initial=0))
    best, best_count = (0, 0), 0
    for i in range(n):
        if nonblank[n] - nonblank[i] <= best_count:
            break  # no run starting here or later can have more non-blank lines
        for j in range(i + 1, n):
            count = nonblank[j + 1] - nonblank[i]
            if count > best_count and _parses("\n".join(lines[i : j + 1])):
                best, best_count = (i, j), count
    return "\n".join(lines[best[0] : best[1] + 1])


def _identifiers(node: ast.AST) -> set[str]:
    """Every identifier inside `node` (dotted names split): the dependency edges of EvalPlus's `sanitize`."""
    names: set[str] = set()
    for sub in ast.walk(node):
        for field in _IDENTIFIER_FIELDS:
            value = getattr(sub, field, None)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    names.update(item.split("."))
    return names


def _definition_name(node: ast.stmt) -> str | None:
    """The name EvalPlus files a top-level statement under (tree-sitter's first `identifier` child): a def's or
    class's name, an assignment's target name, else its value's name when that is a bare name; None otherwise."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    target = node.targets[0] if isinstance(node, ast.Assign) else node.target  # type: ignore[attr-defined]
    bare = (target.lineno, target.col_offset) == (node.lineno, node.col_offset)  # `(a) = 1` is not a bare identifier
    if isinstance(target, ast.Name) and bare:
        return target.id
    single = isinstance(node, ast.AnnAssign) or len(node.targets) == 1  # type: ignore[attr-defined]
    value = node.value  # type: ignore[attr-defined]
    return value.id if single and isinstance(value, ast.Name) else None


def _reaching_definitions(code: str, entry_point: str) -> str:
    """EvalPlus's `extract_target_code_or_empty` on parsed `code`: every top-level import (not `from __future__`,
    a different tree-sitter node), then the first top-level definition of each name (undecorated classes,
    undecorated functions that contain a `return`, assignments) that the entry point reaches through the identifiers
    it uses, in source order; "" when nothing is kept or `code` does not parse."""
    if not _parses(code):
        return ""
    tree = ast.parse(code)
    imports: list[ast.stmt] = []
    definitions: dict[str | None, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.module != "__future__"):
            imports.append(node)
        elif (
            isinstance(node, ast.ClassDef)
            and not node.decorator_list
            or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not node.decorator_list
            and any(isinstance(sub, ast.Return) for sub in ast.walk(node))
            or isinstance(node, (ast.Assign, ast.AnnAssign))
        ):
            definitions.setdefault(_definition_name(node), node)
    uses = {name: _identifiers(node) for name, node in definitions.items()}
    reached, todo = {entry_point}, [entry_point]
    while todo:
        for name in uses.get(todo.pop(), set()) - reached:
            reached.add(name)
            todo.append(name)
    kept = imports + [node for name, node in definitions.items() if name in reached]
    return "\n".join(ast.get_source_segment(code, node) or "" for node in kept).strip()


def sanitize_code(completion: str, entry_point: str) -> str:
    """EvalPlus's `sanitize(completion, entrypoint)`: the reaching definitions of the longest parsable run of lines,
    or that run itself when they are empty."""
    span = longest_code_span(completion)
    return _reaching_definitions(span, entry_point) or span


def _bound_names(node: ast.stmt) -> set[str]:
    """The names a top-level statement binds (defs, classes, assignment targets, imports)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {sub.id for target in targets if target is not None for sub in ast.walk(target) if isinstance(sub, ast.Name)}


def prompt_context(prompt: str, code: str, entry_point: str) -> str:
    """The HumanEval prompt's top-level statements an answer may rely on without restating them: its imports, and
    its helper functions and globals whose names `code` does not define; the entry point's stub never ("" when the
    prompt is not Python)."""
    if not _parses(prompt):
        return ""
    defined = {entry_point}
    if _parses(code):
        defined |= {name for node in ast.parse(code).body for name in _bound_names(node)}
    kept = [
        ast.get_source_segment(prompt, node) or ""
        for node in ast.parse(prompt).body
        if isinstance(node, (ast.Import, ast.ImportFrom)) or not _bound_names(node) & defined
    ]
    return "\n\n".join(kept)


def synthesize_instruction(prompt: str) -> str:
    """HumanEvalPack's `instruction` for a HumanEval prompt (octopack create_instructions.py `python_instruct`): the
    last `def` is the function; its signature (after "def ", trailing ":" dropped) and its docstring, every non-blank
    line stripped, in "Write a Python function `{signature}` to solve the following problem:\n{docstring}"."""
    start = prompt.rfind("def ")
    parts = re.split(r'"""|\'\'\'', prompt[start:]) if start >= 0 else []
    if len(parts) != 3:  # before, inside and after the docstring's quotes
        raise ValueError("the prompt needs a `def` with one triple-quoted docstring to derive an instruction")
    signature = parts[0][len("def ") :].strip().strip(":")
    docstring = "\n".join(line.strip() for line in parts[1].split("\n") if line.strip())
    return f"Write a Python function `{signature}` to solve the following problem:\n{docstring}"


def synthesize_prompt(instruction: str, code_prompt: str) -> str:
    """The `humanevalsynthesize-python` prompt (`--prompt alpaca-chat`): instruction, then the code prompt as the
    start of the response, the whole stripped so that the model continues right after the docstring."""
    return (SYNTHESIZE_HEAD + instruction.strip() + SYNTHESIZE_RESPONSE + code_prompt).strip()


def synthesize_generation(completion: str) -> str:
    """humanevalpack.py `remove_last_block` of the right-stripped completion: cut at the first stop word, then before
    the first non-blank line that starts with neither a space nor a tab (the function's body ends there)."""
    code = truncate_at_stop(completion.rstrip(), SYNTHESIZE_STOP)
    lines = code.split("\n")
    for i, line in enumerate(lines):
        if line.strip() and line[0] not in " \t":
            return "\n".join(lines[:i])
    return code


def _prompt_imports(prompt: str) -> str:
    """The import lines of a HumanEval prompt (e.g. `from typing import List`)."""
    return "".join(line + "\n" for line in prompt.splitlines() if _IMPORT.match(line))


def build_program(
    prompt: str, completion: str, entry_point: str, mode: str = "completion", extract: str = "reference"
) -> str:
    """The candidate program (without tests) for a HumanEval prompt and one completion."""
    if mode == "completion":
        return prompt + truncate_at_stop(completion)
    if mode == "synthesize":
        return prompt.rstrip() + synthesize_generation(completion)
    if mode != "instruct":
        raise ValueError(f"humaneval mode={mode!r}; allowed: {', '.join(MODES)}")
    if check_extract(extract, EXTRACT_RULES, "humaneval") == "lenient":
        code = extract_code(completion, entry_point)
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
            return _prompt_imports(prompt) + code
        return prompt + code
    code = sanitize_code(completion, entry_point)
    context = prompt_context(prompt, code, entry_point) if extract == "reference" else ""
    return (context + "\n\n\n" if context else "") + code + "\n"


def build_test_program(program: str, test: str, entry_point: str) -> str:
    """The program that is executed: candidate program, the suite's tests, and the `check(entry_point)` call."""
    return program + "\n" + test + f"\ncheck({entry_point})\n"


@register_suite
class HumanEvalSuite(GenerationSuite):
    """HumanEval (164 problems; rows `task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`).

    Options (constructor): `mode` "completion" | "instruct" | "synthesize"; `extract` (instruct mode) "reference"
    (EvalPlus's sanitize, the default) | "standalone" | "lenient", see the module docstring; `samples` n (1 = greedy
    pass@1); `temperature` and `top_p` for n > 1; `k` the pass@k values to report (those <= n); `timeout_s`,
    `memory_mb`, `workers` and `sandbox` ("bwrap" | "guard") of the sandbox. Left as None, `samples`,
    `temperature`, `k` and `timeout_s` are 1, 0.8, (1, 10, 100) and 3 s, or synthesize mode's reference values
    `SYNTHESIZE_DEFAULTS` (50, 0.2, (1, 5, 10), 20 s).
    Executes model-written code: `needs_code_execution = True`, the runner must refuse unless
    `eval.allow_code_execution` is true; the constructor refuses (ValueError, one line) a `sandbox` that cannot run
    here, so the refusal comes before any model loads.

    Generator contract for `run()`: n == 1 calls `generate(prompts, stop=..., max_new_tokens=...)` (greedy) and
    expects one completion per prompt; n > 1 calls `generate(prompts, stop=..., max_new_tokens=...,
    num_return_sequences=n, do_sample=True, temperature=..., top_p=...)` and expects len(prompts) * n completions,
    prompt-major (the n samples of prompt 0 first). Records hold `completion`/`correct`/`extracted`/`status` of the
    first sample, and `completions`, `passed` (one bool per sample), `statuses`, `n_samples`, `n_correct` and
    `sandbox` (the mode that ran them). `aggregate()` gives `pass@1` (mean of per-problem pass_at_k(n, c, 1); the
    greedy accuracy when n == 1), `pass@k` for each k in `k` with k <= n, `accuracy` (= pass@1), `n` (problems) and
    `sandbox`.
    """

    name: ClassVar[str] = "humaneval"
    hub: ClassVar[HubSource | None] = HubSource("openai/openai_humaneval", None, "test")
    required_keys: ClassVar[tuple[str, ...]] = ("task_id", "prompt", "test", "entry_point")
    stop: ClassVar[tuple[str, ...]] = CODE_STOP
    max_new_tokens: ClassVar[int] = 512
    needs_code_execution: ClassVar[bool] = True

    def __init__(
        self,
        mode: str = "completion",
        samples: int | None = None,
        temperature: float | None = None,
        top_p: float = 0.95,
        k: Sequence[int] | None = None,
        timeout_s: float | None = None,
        memory_mb: int = 1024,
        workers: int | None = None,
        extract: str = "reference",
        sandbox: str = "bwrap",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"eval.mode={mode!r}; allowed: {', '.join(MODES)}")
        defaults = SYNTHESIZE_DEFAULTS if mode == "synthesize" else {}
        samples = defaults.get("samples", 1) if samples is None else samples
        temperature = defaults.get("temperature", 0.8) if temperature is None else temperature
        k = defaults.get("k", (1, 10, 100)) if k is None else k
        timeout_s = defaults.get("timeout_s", 3.0) if timeout_s is None else timeout_s
        if samples < 1:
            raise ValueError(f"eval.samples={samples} must be >= 1")
        self.mode = mode
        self.extract = check_extract(extract, EXTRACT_RULES, "humaneval")
        self.samples = samples
        self.temperature = temperature
        self.top_p = top_p
        self.k = tuple(k)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.workers = workers
        self.sandbox = check_sandbox(sandbox)
        if mode == "instruct":  # the answer is free text around a fenced block: stop at the template's next turn
            self.stop = TEXT_STOP  # type: ignore[misc]
        if mode == "synthesize":
            self.stop = SYNTHESIZE_STOP  # type: ignore[misc]
            self.max_new_tokens = SYNTHESIZE_MAX_NEW_TOKENS  # type: ignore[misc]

    def examples(self, rows: Sequence[Mapping[str, Any]], template: str | None) -> list[Example]:
        """One example per problem; the completion-mode prompt is the raw code prompt, instruct mode renders it in
        the template, synthesize mode builds the reference's own prompt (the row's `instruction`, else derived)."""
        for i, row in enumerate(rows, start=1):
            if "test" not in row and ("plus_input" in row or "base_input" in row):
                raise EvalDataError(
                    f"{self.name}: row {i} is EvalPlus's raw form (base_input/plus_input, no `test`); use the "
                    "`test`-field form (e.g. the hub's evalplus/humanevalplus)"
                )
        self.check_rows(rows, self.name)
        out = []
        for row in rows:
            code_prompt = row["prompt"]
            if self.mode == "synthesize":
                prompt = synthesize_prompt(self._instruction(row), code_prompt)
            elif self.mode == "instruct":
                prompt = self.prompt(template, INSTRUCTION + code_prompt)
            else:
                prompt = code_prompt
            out.append(
                Example(
                    id=str(row["task_id"]),
                    prompt=prompt,
                    reference=row.get("canonical_solution", ""),
                    meta={"code_prompt": code_prompt, "test": row["test"], "entry_point": row["entry_point"]},
                )
            )
        return out

    def _instruction(self, row: Mapping[str, Any]) -> str:
        """Synthesize mode's instruction of a row: its `instruction` field, else HumanEvalPack's derivation."""
        if row.get("instruction"):
            return str(row["instruction"])
        try:
            return synthesize_instruction(row["prompt"])
        except ValueError as err:
            raise EvalDataError(f"{self.name}: problem {row['task_id']}: {err} (eval.mode=synthesize)") from err

    def program(self, completion: str, example: Example) -> str:
        """The full program executed for one completion (candidate + tests + check call)."""
        meta = example.meta
        candidate = build_program(meta["code_prompt"], completion, meta["entry_point"], self.mode, self.extract)
        return build_test_program(candidate, meta["test"], meta["entry_point"])

    def _source(self, completion: str, example: Example) -> str:
        """`program` without its final `check(entry_point)` call, which the sandbox's harness makes itself."""
        meta = example.meta
        candidate = build_program(meta["code_prompt"], completion, meta["entry_point"], self.mode, self.extract)
        return candidate + "\n" + meta["test"]

    def score(self, completion: str, example: Example) -> dict[str, Any]:
        """Execute one completion: `correct` (tests passed), `extracted` (the program), `status`, `detail`."""
        return self._records_of([completion], [example])[0]

    def _records_of(self, completions: Sequence[str], examples: Sequence[Example]) -> list[dict[str, Any]]:
        """Execute completions (aligned with examples) in parallel; one score dict each."""
        pairs = list(zip(completions, examples, strict=True))
        programs = [self.program(c, ex) for c, ex in pairs]
        results = execute_programs(
            [self._source(c, ex) for c, ex in pairs],
            self.timeout_s,
            self.memory_mb,
            self.workers,
            sandbox=self.sandbox,
            entry_points=[ex.meta["entry_point"] for ex in examples],
        )
        return [
            {"correct": r.passed, "extracted": p, "status": r.status, "detail": r.detail, "sandbox": self.sandbox}
            for p, r in zip(programs, results, strict=True)
        ]

    def run(self, generate: GenerateFn, examples: Sequence[Example]) -> list[dict[str, Any]]:
        """Per-problem records: n completions per prompt (greedy when n == 1), each executed against the tests."""
        n = self.samples
        prompts = [ex.prompt for ex in examples]
        if n == 1:
            completions = generate(prompts, stop=list(self.stop), max_new_tokens=self.max_new_tokens)
        else:
            completions = generate(
                prompts,
                stop=list(self.stop),
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=n,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
            )
        if len(completions) != len(examples) * n:
            raise ValueError(f"{self.name}: generate gave {len(completions)} completions, expected {len(examples) * n}")
        repeated = [ex for ex in examples for _ in range(n)]
        scored = self._records_of(completions, repeated)
        records = []
        for j, ex in enumerate(examples):
            group = scored[j * n : (j + 1) * n]
            texts = list(completions[j * n : (j + 1) * n])
            records.append(
                {
                    "id": ex.id,
                    "prompt": ex.prompt,
                    "completion": texts[0],
                    "reference": ex.reference,
                    **group[0],
                    "completions": texts,
                    "passed": [g["correct"] for g in group],
                    "statuses": [g["status"] for g in group],
                    "n_samples": n,
                    "n_correct": sum(g["correct"] for g in group),
                }
            )
        return records

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """`pass@1` (and `pass@k` for k <= samples) averaged over problems, `accuracy` (= pass@1), `n` and the
        `sandbox` mode the programs ran in."""
        if not records:
            return {"pass@1": 0.0, "accuracy": 0.0, "n": 0, "sandbox": self.sandbox}
        counts = [(int(r.get("n_samples", 1)), int(r.get("n_correct", bool(r["correct"])))) for r in records]
        n_min = min(n for n, _ in counts)
        metrics: dict[str, Any] = {}
        for k in sorted({1, *self.k}):
            if k <= n_min:
                metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
        metrics["accuracy"] = metrics["pass@1"]
        metrics["n"] = len(records)
        metrics["sandbox"] = self.sandbox
        return metrics


@register_suite
class HumanEvalPlusSuite(HumanEvalSuite):
    """HumanEval+ (EvalPlus): the HumanEval problems with the stronger plus tests in the `test` field."""

    name: ClassVar[str] = "humaneval_plus"
    hub: ClassVar[HubSource | None] = HubSource("evalplus/humanevalplus", None, "test")
