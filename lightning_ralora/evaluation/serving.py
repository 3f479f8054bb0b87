"""`eval.backend=openai`: the generation suites' completions come from a serving engine (vLLM, SGLang, `transformers
serve`, any OpenAI-compatible completions endpoint) instead of `model.generate` in this process. docs/serving.md has
the recipes.

Same prompts: every prompt goes to POST `{eval.base_url}/completions` (the suites render their prompts, chat template
included, in this process; the chat endpoint would render them again with the server's copy of the template). The
server must see the token ids in-process generation feeds the model (`generate.prompt_encoder`): the prompt is sent
as text when the tokenizer's defaults, which servers apply to a text prompt, encode it to those ids (also with a
leading BOS text removed, which the server adds back), else as the ids themselves (vLLM, SGLang and OpenAI's own API
take them; `transformers serve` does not, and such a prompt is refused there with one line).

Same decoding (`generate.decoding_arguments`): greedy is temperature 0; sampling sends the temperature, top_p and top_k
in-process decoding uses (the call's, else the model's generation config: `generation_config`), and a seed per prompt
and sample derived from the run's seed and the prompt's text (engines that honour seeds reproduce a run's samples);
`num_return_sequences=n` is `n` in one request, or n requests where the engine ignores `n` (transformers serve). Beam
search goes where the engine has it: vLLM's `use_beam_search` (its score divides by prompt + answer length, HF's by
the answer's: the best beam can differ; its beam search applies no stop strings, so a call with stop strings is
refused), transformers serve's HF `generate(num_beams=...)` (the in-process search); other engines refuse beams with
one line, before any request when the suite's protocol asks for them (`check_decoding`). Completions are cut at the
call's stop strings as in-process ones are. What the engine is comes from GET /models (`owned_by` "vllm" / "sglang",
transformers serve's `status` entries; else a plain OpenAI-compatible server), or from `eval.engine`.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm
from transformers import GenerationConfig

from lightning_ralora.evaluation.base import CLASSIFICATION_SUITES
from lightning_ralora.evaluation.endpoint import EndpointError, OpenAIClient
from lightning_ralora.evaluation.generate import decoding_arguments, prompt_encoder, truncate_at_stop

log = logging.getLogger(__name__)

ENGINES = ("vllm", "sglang", "transformers", "openai")  # eval.engine values; openai: any other compatible server
TOP_K_ENGINES = ("vllm", "sglang")  # engines taking `top_k` as a request field (transformers serve: in its config)
DEFAULTS: dict[str, Any] = {"api_key_env": "OPENAI_API_KEY", "concurrency": 64, "request_timeout": 600.0}
DEFAULTS |= {"max_retries": 3, "backoff": 2.0}
# what `model.generate` samples with when neither the call nor the model's generation config sets it
HF_SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
REQUIRED = {
    "base_url": "the server's OpenAI-compatible root, e.g. http://127.0.0.1:8000/v1",
    "model": "the served model's name, as GET <base_url>/models lists it",
}


@dataclass
class ServedTask:
    """What the runner reads of a run's task: its config (`add_special_tokens`), seed and tokenizer."""

    cfg: Mapping[str, Any]
    seed: int | None
    tokenizer: Any


@dataclass
class ServedModel:
    """The model behind `eval.base_url` as the runner sees a module: the run's task and the generation config its
    export carries (the sampling defaults of in-process decoding); its weights stay on the server."""

    task: ServedTask
    generation_config: Any = None


def _setting(cfg: Mapping[str, Any], key: str) -> Any:
    return DEFAULTS[key] if cfg.get(key) is None else cfg[key]


def served_cfg_problem(cfg: Mapping[str, Any], suites: Sequence[str] = ()) -> str | None:
    """One line on what keeps an `eval.backend=openai` config with these `suites` from running (None when nothing
    does): a missing or bad setting, or a suite scored on the model's logits (which stay on the server)."""
    scored = [n for n in suites if n in CLASSIFICATION_SUITES]
    if scored:
        return f"eval={scored[0]} is scored on the model's logits, not on completions; use eval.backend=builtin"
    for key, what in REQUIRED.items():
        if not cfg.get(key):
            return f"eval.backend=openai needs eval.{key} ({what}); see docs/serving.md"
    concurrency = _setting(cfg, "concurrency")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        return f"eval.concurrency must be a positive integer (requests in flight), got {concurrency!r}"
    retries = _setting(cfg, "max_retries")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        return f"eval.max_retries must be an integer >= 0, got {retries!r}"
    for key in ("request_timeout", "backoff"):
        value = _setting(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            return f"eval.{key} must be a number of seconds > 0, got {value!r}"
    if cfg.get("engine") is not None and cfg["engine"] not in ENGINES:
        return f"eval.engine={cfg['engine']!r} is unknown; allowed: {list(ENGINES)} (null: detected from /models)"
    return None


def client_of(cfg: Mapping[str, Any]) -> OpenAIClient:
    """The HTTP client of the `eval` config's endpoint (`eval.base_url`, `eval.model`, `eval.api_key_env`, ...)."""
    return OpenAIClient(
        cfg.get("base_url") or "",
        cfg.get("model") or "",
        str(_setting(cfg, "api_key_env")),
        timeout=float(_setting(cfg, "request_timeout")),
        max_retries=int(_setting(cfg, "max_retries")),
        backoff=float(_setting(cfg, "backoff")),
        prefix="eval",
    )


def detect_engine(models: Sequence[Mapping[str, Any]]) -> str:
    """The engine behind a /models listing: the `owned_by` vLLM and SGLang write, transformers serve's `status`
    entries; "openai" (a plain OpenAI-compatible server) otherwise."""
    owners = {str(m.get("owned_by")) for m in models}
    for name in ("vllm", "sglang"):
        if name in owners:
            return name
    return "transformers" if any(isinstance(m.get("status"), Mapping) for m in models) else "openai"


def connect(cfg: Mapping[str, Any]) -> tuple[OpenAIClient, str]:
    """(client, engine) once the endpoint answered GET /models and lists `eval.model`; EndpointError (one line)
    when it cannot be reached, refuses the key or does not serve the model."""
    problem = served_cfg_problem(cfg)
    if problem:
        raise EndpointError(problem)
    client = client_of(cfg)
    models = client.models()
    if models is not None:
        ids = [str(m.get("id")) for m in models]
        if client.model not in ids:
            raise EndpointError(
                f"eval.model={client.model} is not served at {client.where} (it serves: {', '.join(ids) or 'none'}); "
                "give the name as its /models lists it"
            )
    return client, cfg.get("engine") or detect_engine(models or [])


def check_decoding(suites: Mapping[str, Any], engine: str, where: str) -> None:
    """Refuse (EndpointError, before any request) a suite whose protocol decodes with beam search on an engine
    without it; warn that vLLM's beam search ranks beams unlike HF's."""
    for name, suite in suites.items():
        beams = int(getattr(suite, "num_beams", 1) or 1)
        if beams > 1 and engine not in ("vllm", "transformers"):
            raise EndpointError(
                f"eval={name} decodes with beam search (num_beams={beams}) and {where} ({engine}) has none; serve "
                "with vLLM or transformers serve, or set eval.num_beams=1 (greedy, a deviation from the protocol)"
            )
        if beams > 1 and engine == "vllm":
            log.warning("eval=%s: vLLM's beam search normalises by prompt + answer length (HF: the answer's)", name)


def request_seed(seed: int, prompt: str, sample: int) -> int:
    """A request's sampling seed from the run's seed, the prompt's text and the sample's index: the same sample of
    the same prompt gets the same seed whatever the shard, order or concurrency."""
    return (int(seed) * 1_000_003 + zlib.crc32(prompt.encode()) + sample * 10_007) % 2**31


class EndpointGenerate:
    """`generate(prompts, stop=[...], max_new_tokens=N, **decoding) -> list[str]` through an OpenAI-compatible
    completions endpoint, with `make_generate`'s contract (prompt-major, `num_return_sequences` per prompt, cut at
    the stop strings); up to `concurrency` requests in flight. See the module docstring for what is sent."""

    def __init__(
        self,
        client: OpenAIClient,
        engine: str,
        tokenizer: Any,
        concurrency: int = 64,
        max_new_tokens_cap: int | None = None,
        add_special_tokens: bool = True,
        seed: int | None = None,
        generation_config: Any = None,
        progress: bool = True,
    ) -> None:
        self.client, self.engine, self.tokenizer = client, engine, tokenizer
        self.concurrency, self.cap, self.seed, self.progress = int(concurrency), max_new_tokens_cap, seed, progress
        self.generation_config = generation_config if generation_config is not None else GenerationConfig()
        self.encode = prompt_encoder(tokenizer, add_special_tokens)
        self._warned_top_k = False

    def wire_prompt(self, prompt: str) -> str | list[int]:
        """The prompt as sent: its text when the server's tokenization of it gives the in-process ids, else the ids."""
        ids = self.encode(prompt)
        bos = getattr(self.tokenizer, "bos_token", None)
        texts = [prompt] + ([prompt[len(bos) :]] if isinstance(bos, str) and bos and prompt.startswith(bos) else [])
        for text in texts:
            if text and list(self.tokenizer(text)["input_ids"]) == ids:
                return text
        if self.engine == "transformers":
            raise EndpointError(
                f"{self.client.where}: transformers serve takes text prompts only, and the server would encode this "
                f"one unlike in-process generation (ids {ids[:6]}...); serve with vLLM or SGLang, which take token ids"
            )
        return ids

    def default(self, name: str) -> Any:
        """A sampling setting as in-process decoding falls back to it: the model's generation config, else
        transformers' default."""
        value = getattr(self.generation_config, name, None)
        return HF_SAMPLING_DEFAULTS[name] if value is None else value

    def decoding_fields(self, args: Mapping[str, Any], stop: Sequence[str], max_new: int) -> dict[str, Any]:
        """The request fields of a call's decoding (besides prompt, n and seed); EndpointError for a decoding the
        engine cannot do."""
        fields: dict[str, Any] = {"model": self.client.model, "max_tokens": max_new}
        if stop:
            fields["stop"] = list(stop)
        beams, n = int(args.get("num_beams", 1)), int(args.get("num_return_sequences", 1))
        hf_config: dict[str, Any] = {}
        if beams > 1:
            if args["do_sample"] or self.engine not in ("vllm", "transformers"):
                kind = "beam sampling" if args["do_sample"] else "beam search"
                raise EndpointError(f"{self.client.where} ({self.engine}) has no {kind} (num_beams={beams})")
            if self.engine == "vllm" and stop:
                raise EndpointError(f"{self.client.where}: vLLM's beam search applies no stop strings ({list(stop)})")
            if self.engine == "transformers" and n > 1:
                raise EndpointError(f"{self.client.where}: transformers serve returns one beam per request, asked {n}")
            fields["temperature"] = 0.0
            if self.engine == "vllm":
                fields |= {"use_beam_search": True, "n": beams}
            hf_config = {"num_beams": beams, "do_sample": False}
        elif not args["do_sample"]:
            if n > 1:
                raise ValueError(f"generate(): greedy decoding returns one sequence per prompt, asked {n}")
            fields["temperature"] = 0.0
            hf_config = {"do_sample": False}
        else:
            fields["temperature"] = float(args.get("temperature", self.default("temperature")))
            fields["top_p"] = float(args.get("top_p", self.default("top_p")))
            top_k = args.get("top_k", self.default("top_k"))
            hf_config = {"do_sample": True} | ({"top_k": int(top_k)} if top_k else {})
            if top_k and self.engine in TOP_K_ENGINES:
                fields["top_k"] = int(top_k)
            elif top_k and self.engine == "openai" and not self._warned_top_k:
                self._warned_top_k = True
                log.warning("%s takes no top_k: sampling without in-process top_k=%s", self.client.where, top_k)
        if self.engine == "transformers":  # the server's defaults are the model's (do_sample too): say it all
            fields["generation_config"] = json.dumps(hf_config)
        return fields

    def _complete(self, payload: dict[str, Any], want: int) -> list[str]:
        answer = self.client.post("completions", payload)
        choices = answer.get("choices")
        if not (isinstance(choices, list) and all(isinstance(c, Mapping) for c in choices)):
            raise EndpointError(
                f"{self.client.where}: the completions answer has no `choices` list: {str(answer)[:120]}"
            )
        texts = [c.get("text") for c in sorted(choices, key=lambda c: int(c.get("index") or 0))]
        if len(texts) < want or not all(isinstance(t, str) for t in texts[:want]):
            raise EndpointError(
                f"{self.client.where}: the completions answer has {len(texts)} choices with text, asked for {want}"
            )
        return texts[:want]

    def __call__(
        self, prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int = 256, **decoding: Any
    ) -> list[str]:
        """Completions of `prompts` (prompt-major, `num_return_sequences` per prompt), each cut at `stop`."""
        args = decoding_arguments(decoding)
        n = int(args.get("num_return_sequences", 1))
        max_new = min(int(max_new_tokens), int(self.cap)) if self.cap else int(max_new_tokens)
        fields = self.decoding_fields(args, stop, max_new)
        if args["do_sample"] and self.engine == "transformers":  # it ignores `n`: one request per sample
            groups = [(j, 1) for j in range(n)]
        else:
            groups = [(0, n)]
            if n > 1 and not fields.get("use_beam_search"):  # vLLM's beam search: n is the beam width
                fields["n"] = n
        sampled = bool(args["do_sample"]) and self.seed is not None
        requests = []  # (prompt index, payload, completions wanted)
        for i, prompt in enumerate(prompts):
            wire = self.wire_prompt(prompt)
            for j, want in groups:
                seed = {"seed": request_seed(self.seed, prompt, j)} if sampled else {}
                requests.append((i, {**fields, "prompt": wire, **seed}, want))
        results: list[list[str]] = [[] for _ in prompts]
        for (i, _, _), texts in zip(requests, self._run(requests), strict=True):
            results[i] += [truncate_at_stop(t, stop) for t in texts]
        return [t for r in results for t in r]

    def _run(self, requests: list[tuple[int, dict[str, Any], int]]) -> list[list[str]]:
        """Every request's completions, in order, `concurrency` at a time; the first failure stops the rest."""
        if not requests:
            return []
        bar = tqdm(total=len(requests), unit="req", desc="generate (endpoint)", disable=not self.progress, leave=False)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)), thread_name_prefix="endpoint")
        try:
            futures = [pool.submit(self._complete, payload, want) for _, payload, want in requests]
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()


def endpoint_generate(
    module: Any, tokenizer: Any, cfg: Mapping[str, Any], add_special_tokens: bool = True, seed: int | None = None
) -> EndpointGenerate:
    """The runner's `generate` for `eval.backend=openai`: the endpoint of `cfg` (checked again: one GET), the run's
    tokenizer (`tokenizer`, else the module's task's) and its sampling defaults (`module.generation_config`)."""
    client, engine = connect(cfg)
    tok = tokenizer if tokenizer is not None else getattr(getattr(module, "task", None), "tokenizer", None)
    if tok is None:
        raise EndpointError("eval.backend=openai needs the run's tokenizer to encode prompts as the model was trained")
    return EndpointGenerate(
        client,
        engine,
        tok,
        concurrency=int(_setting(cfg, "concurrency")),
        max_new_tokens_cap=cfg.get("max_new_tokens") or None,
        add_special_tokens=add_special_tokens,
        seed=seed,
        generation_config=getattr(module, "generation_config", None),
    )
