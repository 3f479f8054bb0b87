"""Batched decoding for the generation suites: left-padded batches through HF `model.generate` (KV cache, greedy
unless sampling or beam arguments are given), stop strings, prompts sorted by length and the order restored.

Prompts are encoded as training encodes them (`data.tokenizer.encode_prompt`: the tokenizer's BOS first where it
adds one, never two; `add_special_tokens=False` gives the text's ids only). A stop string ends its row (greedy,
sampling) or its beam (beam search: the vectorized beam search of transformers 5 applies a stopping criterion to each
candidate as it applies EOS, so a beam that reaches a stop string is a finished hypothesis), so a prompt's
completions do not depend on the other prompts of its batch."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lightning_ralora.data.tokenizer import encode_prompt, special_affixes

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "num_return_sequences", "do_sample", "num_beams")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def prompt_encoder(tokenizer: Any, add_special_tokens: bool = True) -> Callable[[str], list[int]]:
    """`encode(prompt) -> ids` as the decoders feed prompts to the model: as tasks/sft.py encodes training prompts
    (`encode_prompt`: the tokenizer's BOS first where it adds one, never two); an empty prompt is [BOS] (else
    [pad]), since generation needs at least one position."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id
    prefix = special_affixes(tokenizer)[0] if add_special_tokens else []

    def encode(prompt: str) -> list[int]:
        return encode_prompt(tokenizer, prompt, add_special_tokens, prefix) or [fill_id]

    return encode


def decoding_arguments(sampling: dict[str, Any]) -> dict[str, Any]:
    """A generate() call's decoding arguments as the decoders read them: None values dropped, `do_sample` set (on
    when temperature / top_p / top_k are given, unless the call sets it). TypeError for an argument outside
    SAMPLING_KEYS, ValueError for counts below 1 or more beam-search sequences than beams."""
    sampling = {k: v for k, v in sampling.items() if v is not None}
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"generate() got unknown arguments {sorted(unknown)}; allowed: {list(SAMPLING_KEYS)}")
    if "temperature" in sampling or "top_p" in sampling or "top_k" in sampling:
        sampling.setdefault("do_sample", True)
    sampling.setdefault("do_sample", False)
    n_ret = int(sampling.get("num_return_sequences", 1))
    beams = int(sampling.get("num_beams", 1))
    if beams < 1 or n_ret < 1 or (beams > 1 and not sampling["do_sample"] and n_ret > beams):
        raise ValueError(
            f"generate(): num_beams={beams}, num_return_sequences={n_ret}; both must be >= 1 and beam search "
            "returns at most num_beams sequences per prompt"
        )
    return sampling


class StopOnStrings(StoppingCriteria):
    """Ends each row (each beam candidate, in beam search) once its completion contains a stop string (EOS is
    handled by `generate` itself); the batch ends when every row has ended."""

    def __init__(self, tokenizer: Any, prompt_len: int, stop: Sequence[str]) -> None:
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, [s for s in stop if s]
        self.tail = max((len(s) for s in self.stop), default=0) + 8  # tokens to decode: enough for any stop string

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :]
        texts = self.tokenizer.batch_decode(new[:, -self.tail :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool, device=input_ids.device)


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _max_over_ranks(value: int, device: torch.device) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@contextmanager
def _seeded(seed: int | None, batch: int, sampling: bool, device: torch.device) -> Iterator[None]:
    """Sampling under a generator seeded by (seed, rank, batch), the caller's RNG state restored afterwards; a no-op
    for greedy and beam search, or without a seed."""
    if seed is None or not sampling:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((int(seed) * 1_000_003 + _rank() * 10_007 + batch) % 2**63)
        yield


def make_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    batch_size: int,
    device: torch.device | str | None = None,
    max_new_tokens_cap: int | None = None,
    progress: bool | None = None,
    add_special_tokens: bool = True,
    seed: int | None = None,
) -> Callable[..., list[str]]:
    """A `generate(prompts, stop=[...], max_new_tokens=N, **decoding) -> list[str]` over `model` (a causal LM).

    Greedy unless decoding arguments are given: temperature / top_p / top_k turn sampling on (unless `do_sample`
    is given: pass `do_sample=False` to keep beam search with a reference's unused temperature); `num_beams=B`
    is beam search. With `num_return_sequences=k` the list holds k completions per prompt, prompt-major (the k of
    prompt 0 first); beam search returns the k best beams (k <= B). `add_special_tokens` is the training run's
    `task.add_special_tokens` (how its prompts were encoded). `seed`: sampling draws from a generator seeded per
    batch by (seed, rank, batch), so a run's samples are reproducible (the global RNG is left as it was).
    `max_new_tokens_cap` (`eval.max_new_tokens`) bounds the suites' own budgets. Under FSDP every rank runs the
    same number of `generate` calls (`synced_gpus`), so ranks with shorter shards run dummy batches."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id  # for an empty prompt
    show = (_rank() == 0) if progress is None else progress
    encode = prompt_encoder(tokenizer, add_special_tokens)

    def run_batch(ids: list[list[int]], stop: Sequence[str], max_new: int, sampling: dict, synced: bool) -> list:
        width = max(len(x) for x in ids)
        # left padding: every prompt ends at the same position, so new tokens follow the prompt directly
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        criteria = StoppingCriteriaList([StopOnStrings(tokenizer, width, stop)] if stop else [])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            use_cache=True,
            pad_token_id=pad_id,
            stopping_criteria=criteria,
            synced_gpus=synced,
            **sampling,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [truncate_at_stop(t, stop) for t in texts]

    def generate(prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int = 256, **sampling: Any):
        """Completions of `prompts` (same order), each cut at the first stop string."""
        sampling = decoding_arguments(sampling)
        n_ret = int(sampling.get("num_return_sequences", 1))
        max_new = min(int(max_new_tokens), int(max_new_tokens_cap)) if max_new_tokens_cap else int(max_new_tokens)
        encoded = [encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first: similar widths
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        synced = _is_fsdp(model) and torch.distributed.is_initialized()
        n_batches = _max_over_ranks(len(batches), device) if synced else len(batches)
        results: list[list[str]] = [[] for _ in prompts]
        was_training = model.training
        model.eval()
        from tqdm.auto import tqdm

        # the bar's rate is in examples/s (unit="ex")
        bar = tqdm(total=len(prompts), unit="ex", desc="generate", disable=not show or not prompts, leave=False)
        try:
            with torch.inference_mode():
                for b in range(n_batches):
                    if b >= len(batches):  # FSDP: keep the collectives of every rank in step
                        with _seeded(seed, b, sampling["do_sample"], device):
                            run_batch([[fill_id]], stop, max_new, sampling, synced)
                        continue
                    with _seeded(seed, b, sampling["do_sample"], device):
                        texts = run_batch([encoded[i] for i in batches[b]], stop, max_new, sampling, synced)
                    for j, i in enumerate(batches[b]):
                        results[i] = texts[j * n_ret : (j + 1) * n_ret]
                    bar.update(len(batches[b]))
        finally:
            bar.close()
            model.train(was_training)
        return [t for r in results for t in r]

    return generate


class ReplayGenerate:
    """A `generate` that hands back completions read from a file (`eval.completions`) instead of decoding, so a
    suite's own `run` and scoring score them unchanged.

    `answers[i]` holds example i's samples, each a list of turns. A prompt equal to an example's prompt gets that
    example's turn-1 answers (the k-th request of a prompt text goes to the k-th example with that prompt, as suites
    ask for their examples in order, in one call or in groups). Any other prompt is a later turn, built by the suite
    from the answers handed out (MT-Bench's turn 2): later turns go to the examples in the order their previous turn
    was handed out, as MT-Bench's `run` asks for them (both turns grouped the same way), and the prompt must contain
    that previous answer, else the prompts cannot be matched and a ValueError says so. `num_return_sequences` must
    equal the file's samples per example. Each text is cut at the call's stop strings, as the decoder cuts its
    completions."""

    def __init__(self, prompts: Sequence[str], answers: Sequence[Sequence[Sequence[str]]]) -> None:
        if len(prompts) != len(answers):
            raise ValueError(f"ReplayGenerate: {len(prompts)} prompts but {len(answers)} answers")
        self.answers = [[list(s) for s in a] for a in answers]
        self.by_prompt: dict[str, deque[int]] = {}
        for i, p in enumerate(prompts):
            self.by_prompt.setdefault(p, deque()).append(i)
        self.turn = [0] * len(prompts)  # turns handed out per example
        self.handed: dict[int, list[str]] = {}  # the texts last handed out per example
        self.pending: deque[int] = deque()  # examples whose next turn is due, in the order the previous one went out

    def _owner(self, prompt: str) -> int:
        """The example a requested prompt belongs to (see the class docstring)."""
        queue = self.by_prompt.get(prompt)
        if queue:
            return queue.popleft()
        if not self.pending:
            raise ValueError(
                f"eval.completions: the suite asked for a prompt that is no example's and no later turn is due: "
                f"{prompt[:80]!r}"
            )
        i = self.pending.popleft()
        previous = [t.strip() for t in self.handed[i]]
        if not any(t in prompt for t in previous):
            raise ValueError(
                f"eval.completions: a later-turn prompt does not contain the answer handed out before it "
                f"({previous[0][:40]!r}); the replay cannot match this suite's prompts"
            )
        return i

    def __call__(self, prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int = 0, **decoding: Any):
        """The file's completions for `prompts` (prompt-major, `num_return_sequences` per prompt), cut at `stop`."""
        n = int(decoding.get("num_return_sequences") or 1)
        out = []
        for prompt in prompts:
            i = self._owner(prompt)
            samples, turn = self.answers[i], self.turn[i]
            if len(samples) != n:
                raise ValueError(
                    f"eval.completions: the suite asked for {n} samples per prompt, the file has {len(samples)}"
                )
            if turn >= len(samples[0]):
                raise ValueError(
                    f"eval.completions: the suite asked for turn {turn + 1}, the file has {len(samples[0])}"
                )
            texts = [truncate_at_stop(s[turn], stop) for s in samples]
            self.turn[i], self.handed[i] = turn + 1, texts
            if turn + 1 < len(samples[0]):
                self.pending.append(i)
            out += texts
        return out
