"""MT-Bench (Zheng et al., 2023): 80 two-turn questions in 8 categories, each turn graded 1-10 by an LLM judge, as
FastChat's llm_judge does it (gen_model_answer.py, gen_judgment.py --mode single, show_result.py, common.py).

Data: FastChat's `data/mt_bench/question.jsonl` (`question_id`, `category`, `turns` [2 strings]) as
`eval.data_files`, and its `data/mt_bench/reference_answer/gpt-4.jsonl` (GPT-4's answers, one row per question:
`question_id`, `choices[0].turns`) as `eval.judge.reference_answers`. Neither is a hub dataset: download both from
https://github.com/lm-sys/FastChat/tree/main/fastchat/llm_judge/data/mt_bench. Questions of the NEED_REF_CATS
categories (math, reasoning, coding) are graded against the reference file's answers, never against the `reference`
field of question.jsonl (FastChat ignores that field; question 123 has none); without the file the suite fails while
the examples are built, before any generation.

Generation (gen_model_answer.py): per-category temperatures (`TEMPERATURES`; 0.7 for a category not listed), greedy
below 1e-4, 1024 new tokens; turn 2 is generated on the conversation so far, with turn 1's stripped answer
(`render_two_turn`). `category_temperatures` (`eval.category_temperatures`) overrides some categories and
`greedy=true` (`eval.greedy`) decodes every category greedily; both are deviations from the protocol. Not matched:
FastChat generates one question at a time after `torch.manual_seed(0)`, here prompts are batched (left-padded), so
sampled answers differ draw by draw.

Judging (gen_judgment.py / common.py, single-answer grading): FastChat's judge prompts verbatim
(`data/mt_bench_judge_prompts.jsonl`: single-v1, single-math-v1 and their -multi-turn forms), a system and a user
message at temperature 0, max_tokens 2048, to any OpenAI-compatible chat-completions endpoint (`eval.judge.base_url`,
`eval.judge.model`; the API key is read from the environment variable named by `eval.judge.api_key_env`, default
OPENAI_API_KEY, and is never logged nor written to records or metrics). The rating is the first "[[x]]" in the
judgment, else the first "[x]"; none scores -1 and is left out of the means (`aggregate`, as show_result.py). A
judge that keeps failing raises `MTBenchJudgeError` (FastChat records "$ERROR$", which scores -1).

Reachability: before any generation, `GET {base_url}/models` with a short timeout. It costs no tokens and every
OpenAI-compatible server we know of (OpenAI, vLLM, SGLang, llama.cpp, Ollama, LM Studio, LiteLLM) serves it; any HTTP
answer except 401/403 counts as reachable (a proxy without /models still answered), 401/403 means the key was
refused, and a connection error or timeout is an `MTBenchJudgeError` right away.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lightning_ralora.data.templates import render_prompt
from lightning_ralora.evaluation.base import EvalDataError, Example, GenerateFn, GenerationSuite, register_suite
from lightning_ralora.evaluation.endpoint import EndpointError, OpenAIClient

log = logging.getLogger(__name__)

JUDGE_PROMPTS_FILE = Path(__file__).parent / "data" / "mt_bench_judge_prompts.jsonl"

# FastChat common.py: categories graded against a reference answer, and the sampling temperature per category
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
TEMPERATURES: dict[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7  # gen_model_answer.py: a category missing from the table
GREEDY_BELOW = 1e-4  # gen_model_answer.py: do_sample=False below this temperature
REFERENCE_KEY = "eval.judge.reference_answers"


@dataclass(frozen=True)
class JudgePrompt:
    """A single-answer grading prompt: the system message, the user-message template and the rating format."""

    name: str
    system: str
    template: str
    output_format: str


def load_judge_prompts(path: str | Path = JUDGE_PROMPTS_FILE) -> dict[str, JudgePrompt]:
    """The single-answer judge prompts of a FastChat-format judge_prompts.jsonl, by name."""
    prompts = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("type") == "single":
                prompts[row["name"]] = JudgePrompt(
                    row["name"], row["system_prompt"], row["prompt_template"], row["output_format"]
                )
    return prompts


JUDGE_PROMPTS: dict[str, JudgePrompt] = load_judge_prompts()

# common.py's one-score patterns: "[[8]]" / "[[8.5]]", else "[8]"
_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


class MTBenchJudgeError(EndpointError):
    """The judge endpoint could not be reached, refused the request, or answered in an unexpected shape."""


def parse_rating(judgment: str) -> float:
    """The judge's rating: the first "[[x]]" in the judgment, else the first "[x]"; -1.0 when there is none."""
    match = _SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)
    return float(match.group(1)) if match else -1.0


def load_reference_answers(path: str | Path) -> dict[str, list[str]]:
    """{question_id (as a string): [turn-1 answer, turn-2 answer]} from a FastChat reference-answer JSONL (one row
    per question, answers in `choices[0].turns`)."""
    refs: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise EvalDataError(f"{REFERENCE_KEY}={path}: cannot be read ({err.strerror or err})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["choices"][0]["turns"]
            qid = row["question_id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EvalDataError(
                f"{REFERENCE_KEY}={path} line {i}: not a FastChat reference answer "
                '({"question_id": ..., "choices": [{"turns": [answer_1, answer_2]}]})'
            ) from None
        if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, str) for t in turns)):
            raise EvalDataError(f"{REFERENCE_KEY}={path} line {i}: `choices[0].turns` must be 2 strings")
        refs[str(qid)] = list(turns)
    return refs


def _render_turn(template: str | None, question: str, tokenizer: Any = None) -> str:
    """One user turn in the model's prompt template, as its evaluation prompt (`stage="eval"`)."""
    return render_prompt(template, question, tokenizer=tokenizer, stage="eval")


def render_two_turn(
    template: str | None, question_1: str, answer_1: str, question_2: str, tokenizer: Any = None
) -> str:
    """The turn-2 prompt: the conversation so far in the template the model was trained on.

    `chat`: the tokenizer's chat template over [user1, assistant1, user2] with the generation prompt; otherwise the
    turn-1 prompt, the stripped answer, and the turn-2 prompt from its "### Instruction:" on (the whole prompt if the
    template has no such marker), so the response line is whatever the template renders."""
    answer_1 = answer_1.strip()  # gen_model_answer.py keeps the stripped answer in the conversation
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("task.template=chat needs a tokenizer with a chat template")
        messages = [
            {"role": "user", "content": question_1},
            {"role": "assistant", "content": answer_1},
            {"role": "user", "content": question_2},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    first = _render_turn(template, question_1, tokenizer)
    second = _render_turn(template, question_2, tokenizer)
    marker = second.find("### Instruction:")
    return f"{first}{answer_1}\n\n{second[marker:] if marker >= 0 else second}"


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` for a Mapping / DictConfig / attribute object, else `default`."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


class JudgeClient(OpenAIClient):
    """The judge: chat completions at temperature 0 through the shared OpenAI-compatible client (endpoint.py:
    timeouts, retries with backoff, the key from `api_key_env`), its errors as MTBenchJudgeError."""

    error = MTBenchJudgeError

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 2.0,
        max_tokens: int = 2048,
        probe_timeout: float = 5.0,
    ) -> None:
        super().__init__(base_url, model, api_key_env, timeout, max_retries, backoff, probe_timeout, "eval.judge")
        self.max_tokens = max_tokens

    @classmethod
    def from_cfg(cls, judge_cfg: Any) -> JudgeClient:
        """A client from the `eval.judge` config group."""
        return cls(
            base_url=_cfg_get(judge_cfg, "base_url", ""),
            model=_cfg_get(judge_cfg, "model", ""),
            api_key_env=_cfg_get(judge_cfg, "api_key_env", "OPENAI_API_KEY"),
            timeout=float(_cfg_get(judge_cfg, "timeout", 120.0)),
            max_retries=int(_cfg_get(judge_cfg, "max_retries", 3)),
            backoff=float(_cfg_get(judge_cfg, "backoff", 2.0)),
            max_tokens=int(_cfg_get(judge_cfg, "max_tokens", 2048)),
            probe_timeout=float(_cfg_get(judge_cfg, "probe_timeout", 5.0)),
        )

    def probe(self) -> None:
        """Raise MTBenchJudgeError at once if the endpoint cannot be reached or refuses the key (GET /models); a
        judge model the list does not name is only warned about (a proxy may route names it does not list)."""
        ids = [m.get("id") for m in self.models() or []]
        if ids and self.model not in ids:
            log.warning("judge model %r is not in %s/models (%s); the request may fail", self.model, self.base_url, ids)

    def chat(self, system: str, user: str) -> str:
        """The judge's reply to one (system, user) exchange at temperature 0; retried on transient failures."""
        payload = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "n": 1,
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        body = self.post("chat/completions", payload)
        try:
            return body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as err:
            raise MTBenchJudgeError(f"{self.where}: unexpected chat-completions answer ({err!r})") from None


def _check_temperatures(value: Any) -> dict[str, float]:
    """`eval.category_temperatures` as {category: temperature >= 0}; ValueError naming the key otherwise."""
    if value is None:
        return {}
    msg = "eval.category_temperatures must map category names to temperatures >= 0 (e.g. {writing: 0.7, math: 0.0})"
    if not hasattr(value, "items"):
        raise ValueError(f"{msg}; got {value!r}")
    out = {}
    for category, t in value.items():
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= float(t) < float("inf"):
            raise ValueError(f"{msg}; got {category}: {t!r}")
        out[str(category)] = float(t)
    return out


def _sampling(temperature: float) -> dict[str, Any]:
    """generate() arguments for `temperature`: greedy below GREEDY_BELOW, else sampling at that temperature."""
    return {} if temperature < GREEDY_BELOW else {"temperature": temperature, "do_sample": True}


@register_suite
class MTBench(GenerationSuite):
    """MT-Bench: two-turn generation at FastChat's per-category temperatures, each turn graded 1-10 by an
    OpenAI-compatible LLM judge with FastChat's single-answer prompts."""

    name: ClassVar[str] = "mt_bench"
    hub = None  # FastChat's question.jsonl is not a hub dataset: pass eval.data_files (see the module docstring)
    required_keys: ClassVar[tuple[str, ...]] = ("question_id", "category", "turns")
    stop: ClassVar[tuple[str, ...]] = ("\n### Instruction:",)
    max_new_tokens: ClassVar[int] = 1024  # FastChat's gen_model_answer default
    turns: ClassVar[int] = 2

    def __init__(
        self,
        eval_cfg: Any = None,
        tokenizer: Any = None,
        judge_client: JudgeClient | None = None,
        category_temperatures: Mapping[str, float] | None = None,
        greedy: bool = False,
    ) -> None:
        # `judge_client` (not `judge`): the runner passes constructor parameters named like `eval.*` keys, and
        # `eval.judge` holds the settings the client is built from
        if not isinstance(greedy, bool):
            raise ValueError(f"eval.greedy must be true or false; got {greedy!r}")
        self.eval_cfg = eval_cfg
        self.tokenizer = tokenizer
        self._judge = judge_client
        self.template: str | None = None
        judge_cfg = _cfg_get(eval_cfg, "judge")
        self.parallel = int(_cfg_get(judge_cfg, "parallel", 4))
        self.reference_answers: str | None = _cfg_get(judge_cfg, "reference_answers")
        self.greedy = greedy
        self.temperatures = {**TEMPERATURES, **_check_temperatures(category_temperatures)}

    @property
    def judge(self) -> JudgeClient:
        """The judge client (built from `eval.judge` on first use)."""
        if self._judge is None:
            self._judge = JudgeClient.from_cfg(_cfg_get(self.eval_cfg, "judge"))
        return self._judge

    def temperature(self, category: str) -> float:
        """The sampling temperature of a category's questions (FastChat's table, else 0.7; 0 when greedy)."""
        return 0.0 if self.greedy else self.temperatures.get(category, DEFAULT_TEMPERATURE)

    def _decodings(self) -> list[float]:
        """Every temperature a question can get, in a fixed order. Each turn makes one generate call per entry, even
        an empty one, so every rank makes the same calls (FSDP keeps the ranks' collectives in step)."""
        return [0.0] if self.greedy else sorted({*self.temperatures.values(), DEFAULT_TEMPERATURE})

    def _references(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
        """The reference answers of the rows that need one (NEED_REF_CATS), from `eval.judge.reference_answers`."""
        need = [str(r.get("question_id")) for r in rows if str(r.get("category")) in NEED_REF_CATS]
        if not need:
            return {}
        if not self.reference_answers:
            raise EvalDataError(
                f"mt_bench grades {', '.join(NEED_REF_CATS)} questions against reference answers "
                f"({len(need)} here: {', '.join(need[:5])}{', ...' if len(need) > 5 else ''}); set {REFERENCE_KEY} "
                "to FastChat's data/mt_bench/reference_answer/gpt-4.jsonl"
            )
        refs = load_reference_answers(self.reference_answers)
        missing = [q for q in need if q not in refs]
        if missing:
            raise EvalDataError(
                f"{REFERENCE_KEY}={self.reference_answers} has no reference answer for question(s) {', '.join(missing)}"
            )
        return refs

    def examples(self, rows: Sequence[Mapping[str, Any]], template: str | None) -> list[Example]:
        """One example per question: the rendered first turn; `reference` is the reference file's answers (both
        turns) for NEED_REF_CATS questions, else None (question.jsonl's own `reference` field is not used)."""
        self.template = template
        out = []
        for i, row in enumerate(rows, start=1):
            turns = row.get("turns")
            if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns)):
                where = f"question_id={row.get('question_id')}"
                raise EvalDataError(f"mt_bench row {i} ({where}): `turns` must be a list of 2 strings")
        refs = self._references(rows)
        for row in rows:
            qid, category = str(row["question_id"]), str(row["category"])
            out.append(
                Example(
                    id=qid,
                    prompt=_render_turn(template, row["turns"][0], self.tokenizer),
                    reference=refs[qid] if category in NEED_REF_CATS else None,
                    meta={"category": category, "turns": list(row["turns"])},
                )
            )
        return out

    def score(self, completion: str, example: Example) -> dict[str, Any]:
        """Not used: MT-Bench is scored by the judge over both turns in `run`."""
        raise NotImplementedError("mt_bench is scored per conversation by the LLM judge in MTBench.run")

    def check_judge(self) -> None:
        """Fail fast (MTBenchJudgeError) if the judge endpoint is unreachable; the runner may call it early."""
        self.judge.probe()

    def _judge_prompts(self, ex: Example, answers: Sequence[str]) -> list[tuple[JudgePrompt, str]]:
        """(prompt, user message) for turn 1 and turn 2, as gen_judgment.py's single-answer judges."""
        q1, q2 = ex.meta["turns"]
        if ex.meta["category"] in NEED_REF_CATS:
            p1, p2 = JUDGE_PROMPTS["single-math-v1"], JUDGE_PROMPTS["single-math-v1-multi-turn"]
            refs = {"ref_answer_1": ex.reference[0], "ref_answer_2": ex.reference[1]}
        else:
            p1, p2 = JUDGE_PROMPTS["single-v1"], JUDGE_PROMPTS["single-v1-multi-turn"]
            refs = {}
        u1 = p1.template.format(question=q1, answer=answers[0], **refs)
        u2 = p2.template.format(question_1=q1, question_2=q2, answer_1=answers[0], answer_2=answers[1], **refs)
        return [(p1, u1), (p2, u2)]

    def _generate_turn(self, generate: GenerateFn, prompts: Sequence[str], temps: Sequence[float]) -> list[str]:
        """Stripped completions of `prompts`, each at its temperature (one generate call per temperature)."""
        out = [""] * len(prompts)
        for t in self._decodings():
            idx = [i for i, ti in enumerate(temps) if ti == t]
            texts = generate(
                [prompts[i] for i in idx], stop=list(self.stop), max_new_tokens=self.max_new_tokens, **_sampling(t)
            )
            for i, text in zip(idx, texts, strict=True):
                out[i] = text.strip()
        return out

    def run(self, generate: GenerateFn, examples: Sequence[Example]) -> list[dict[str, Any]]:
        """Generate both turns (per temperature), then have the judge rate each turn."""
        missing = [ex.id for ex in examples if ex.meta["category"] in NEED_REF_CATS and not ex.reference]
        if missing:
            raise EvalDataError(
                f"mt_bench: question(s) {', '.join(missing)} need a reference answer; set {REFERENCE_KEY}"
            )
        self.check_judge()  # before any generation: an unreachable judge must not cost a full generation pass
        temps = [self.temperature(ex.meta["category"]) for ex in examples]
        first = self._generate_turn(generate, [ex.prompt for ex in examples], temps)
        second_prompts = [
            render_two_turn(self.template, ex.meta["turns"][0], a1, ex.meta["turns"][1], self.tokenizer)
            for ex, a1 in zip(examples, first, strict=True)
        ]
        second = self._generate_turn(generate, second_prompts, temps)
        answers = list(zip(first, second, strict=True))
        jobs = [pu for ex, ans in zip(examples, answers, strict=True) for pu in self._judge_prompts(ex, ans)]
        with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as pool:
            judgments = list(pool.map(lambda pu: self.judge.chat(pu[0].system, pu[1]), jobs))
        records = []
        for i, (ex, ans) in enumerate(zip(examples, answers, strict=True)):
            turns = []
            for t in range(2):
                prompt, user = jobs[2 * i + t]
                judgment = judgments[2 * i + t]
                turns.append(
                    {
                        "judge_prompt": prompt.name,
                        "judge_input": user,
                        "judgment": judgment,
                        "score": parse_rating(judgment),
                    }
                )
            records.append(
                {
                    "id": ex.id,
                    "category": ex.meta["category"],
                    "temperature": temps[i],
                    "do_sample": temps[i] >= GREEDY_BELOW,
                    "prompt": ex.prompt,
                    "completion": ans[0],
                    "prompt_turn2": second_prompts[i],
                    "completion_turn2": ans[1],
                    "reference": ex.reference,
                    "judge_model": self.judge.model,
                    "judge": turns,
                    "score_turn1": turns[0]["score"],
                    "score_turn2": turns[1]["score"],
                }
            )
        return records

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """As show_result.py (single mode): the mean over the judgments whose score is not -1, per turn (`turn1`,
        `turn2`) and over both (`score`); also `category/<name>`, `n` questions and `n_unparsed` (scores of -1)."""

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else float("nan")

        per_turn: dict[int, list[float]] = {1: [], 2: []}
        per_cat: dict[str, list[float]] = {}
        n_unparsed = 0
        for r in records:
            for t in (1, 2):
                s = float(r[f"score_turn{t}"])
                if s == -1:
                    n_unparsed += 1
                    continue
                per_turn[t].append(s)
                per_cat.setdefault(str(r["category"]), []).append(s)
        metrics: dict[str, float] = {
            "score": mean(per_turn[1] + per_turn[2]),
            "turn1": mean(per_turn[1]),
            "turn2": mean(per_turn[2]),
        }
        metrics.update({f"category/{c}": mean(v) for c, v in sorted(per_cat.items())})
        metrics["n"] = len(records)
        metrics["n_unparsed"] = n_unparsed
        return metrics
