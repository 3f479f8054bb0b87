"""Helpers shared by several test files: small toy networks, composed adapter configs, CSVLogger metrics, hand
formulas for correlations, and a stub OpenAI-compatible judge."""

from __future__ import annotations

import csv
import json
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

from lightning_ralora.run.compose import compose_config


def mlp(*sizes: int, act: type[nn.Module] = nn.Tanh, seed: int | None = None) -> nn.Sequential:
    """Linear(sizes[0], sizes[1]), act, Linear(sizes[1], sizes[2]), ... (no activation after the last linear);
    seeded with `seed` first if given. Target names of the linears: "0", "2", "4", ..."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n, m) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(n, m)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


@lru_cache
def _adapter_yaml(name: str) -> dict[str, Any]:
    return OmegaConf.to_container(compose_config([f"adapter={name}"]).adapter, resolve=False)


def adapter_cfg(name: str = "ralora", **over: Any) -> dict[str, Any]:
    """conf/adapter/<name>.yaml as Hydra composes it (inherited keys included), with `over` merged before the
    interpolations (r_ref: ${.r}) are resolved, as command-line overrides are."""
    return OmegaConf.to_container(OmegaConf.merge(_adapter_yaml(name), over), resolve=True)


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the one CSVLogger file under `run_dir` (csv/version_*/metrics.csv)."""
    (path,) = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"))
    with path.open() as f:
        return list(csv.DictReader(f))


# --- hand formulas (independent references for torchmetrics' Pearson/Spearman) -----------------------------------
def pearson(x: list[float], y: list[float]) -> float:
    """Pearson's r by the textbook formula."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def average_ranks(x: list[float]) -> list[float]:
    """Ranks 0..n-1 where ties share their mean rank, as Spearman's coefficient uses."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


# --- an OpenAI-compatible judge on 127.0.0.1 (MT-Bench cannot reach a real one in tests) -------------------------
class StubJudge(BaseHTTPRequestHandler):
    """GET /v1/models and POST /v1/chat/completions; records every request on `server.requests` and answers with
    `rating(user_message)` (subclasses choose the rating)."""

    def log_message(self, *args: Any) -> None:
        """Silent."""

    def rating(self, user: str) -> str:
        """The judge's verdict for the last user message."""
        return "[[5]]"

    def _send(self, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        """GET /v1/models."""
        self.server.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
        self._send({"object": "list", "data": [{"id": "judge-model", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        """POST /v1/chat/completions."""
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
        verdict = self.rating(body["messages"][-1]["content"])
        self._send(
            {"choices": [{"message": {"role": "assistant", "content": f"Reasonable answer. Rating: {verdict}"}}]}
        )


@contextmanager
def serve_judge(handler: type[StubJudge] = StubJudge) -> Iterator[ThreadingHTTPServer]:
    """A stub judge served on a free local port for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def pids_named(marker: str) -> list[int]:
    """Host pids of processes (live or zombie) whose name (/proc/PID/comm) is `marker`: what a sandbox left behind."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", encoding="utf-8", errors="replace") as f:
                    if f.read().strip() == marker:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


# --- a tokenizer with LLaMA-3's special tokens (BOS/EOS handling, chat templates) ---
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_special_tokenizer(path: Path, post: str | None) -> Path:
    """A byte-level BPE tokenizer with LLaMA-3's special-token names, saved and reloaded as a user's would be.
    `post`: "bos" (LLaMA-3: BOS before every encoding), "eos" (T5: EOS after it) or None (no post-processor)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in (BOS, EOS, PAD):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if post == "bos":
        tk.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
        )
    elif post == "eos":
        tk.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    return path
