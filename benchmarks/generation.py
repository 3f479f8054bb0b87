"""Section 5: generation throughput (examples/s) of the evaluation decoder, `evaluation.generate.make_generate`, on
the tiny Llama (conf/model/tiny_llama.yaml) with LoRA on every target: batch 1 against the configured batch (8),
and merged (`merge_all`, the export form) against unmerged adapters at batch 8. Outside `--quick`, also through a
serving engine (`eval.backend=openai`, evaluation/serving.py): the merged model saved and served by `transformers
serve` on 127.0.0.1 (its own process, as many torch threads as this one), the same prompts sent
`ENDPOINT_CONCURRENCY` at a time (one request at a time reaches the model) and, with `--continuous-batching`, all at
once; each against the fastest in-process batch of the merged model (8, or all prompts in one).

Fixed prompts of varied length, a fixed number of new tokens (greedy; EOS disabled so every row decodes the full
budget), no stop strings. Ratios are of examples/s, i.e. the inverse ratio of the times of one pass over the prompts.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks.common import Env, Figure, call_sampler, fmt_seconds, ratio_figure, round_robin, summarize
from benchmarks.variants import spec
from lightning_ralora.adapters import adapter_layers, inject, merge_all
from lightning_ralora.data.tokenizer import byte_tokenizer
from lightning_ralora.evaluation.endpoint import EndpointError
from lightning_ralora.evaluation.generate import make_generate
from lightning_ralora.evaluation.serving import EndpointGenerate, client_of
from lightning_ralora.run.compose import CONF_DIR

BATCH = 8  # conf/eval/none.yaml's eval.batch_size
ENDPOINT_CONCURRENCY = 8  # requests in flight (eval.concurrency); transformers serve without continuous batching
SERVER_START_S = 180  # how long the server may take to list its model
FULL = {"prompts": 32, "max_new_tokens": 32, "model": {}}
QUICK = {
    "prompts": 8,
    "max_new_tokens": 4,
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
}
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "bird", "sing")


def prompts(n: int) -> list[str]:
    """`n` fixed prompts of 3 to 17 words (deterministic)."""
    return [f"Question {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + 5 * i % 15)) for i in range(n)]


def tiny_llama(overrides: dict[str, Any], env: Env) -> tuple[nn.Module, Any, list[str]]:
    """The tiny Llama of conf/model/tiny_llama.yaml (resized by `overrides`) with LoRA (random B, so merging changes
    the weights) on its target modules, in eval mode; returns (model, tokenizer, target module patterns)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_cfg = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny_llama.yaml"))
    cfg = {k: v for k, v in model_cfg["config"].items() if k != "model_type"} | overrides
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # every row decodes max_new_tokens: fixed work per call
    targets = list(model_cfg["target_modules"])
    inject(model, targets, spec("lora"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(env.device, env.dtype).eval(), tok, targets


@contextmanager
def served(
    model: nn.Module, tok: Any, env: Env, continuous_batching: bool, concurrency: int
) -> Iterator[tuple[EndpointGenerate | None, str]]:
    """(an endpoint `generate` over `transformers serve` of `model`, "") for the block, or (None, why) when the
    server cannot start here (the `serving` extra missing, no free port, a crash); the server is stopped after."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cli = Path(sys.executable).parent / "transformers"
        args = [str(cli), "serve", folder, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        args += ["--device", "cuda" if env.cuda else "cpu"] + (["--continuous-batching"] if continuous_batching else [])
        threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
        with open(Path(folder) / "serve.log", "w") as log:
            server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **threads})
        try:
            client = client_of({"base_url": f"http://127.0.0.1:{port}/v1", "model": folder})
            deadline = time.monotonic() + SERVER_START_S
            while server.poll() is None and time.monotonic() < deadline:
                try:
                    client.models()
                    break
                except EndpointError:
                    time.sleep(0.5)
            if server.poll() is not None or time.monotonic() >= deadline:
                tail = (Path(folder) / "serve.log").read_text()[-300:].strip().splitlines()
                yield None, f"transformers serve did not start ({tail[-1] if tail else 'no output'})"
                return
            yield EndpointGenerate(client, "transformers", tok, concurrency, progress=False), ""
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _pass(generate: Callable[..., list[str]], texts: list[str], max_new_tokens: int) -> Callable[[], list[str]]:
    """One greedy pass over all prompts."""
    return lambda: generate(texts, max_new_tokens=max_new_tokens)


def _sampler(fn: Callable[[], Any], env: Env) -> Callable[[], float]:
    """Wall-clock seconds of one call (a pass lasts long enough; `call_sampler`'s untimed extra calls would triple
    the section's time); the round-robin's warm-up round covers first-call costs."""

    def sample() -> float:
        env.sync()
        t0 = time.perf_counter()
        fn()
        env.sync()
        return time.perf_counter() - t0

    return sample


def run(env: Env, endpoint: bool | None = None) -> dict[str, Any]:
    """Time batch 1, batch 8 and merged batch 8 (interleaved) and report the examples/s ratios; outside `--quick`
    also merged batch-all and (unless `endpoint` is False) the endpoint without and with continuous batching,
    against the fastest merged batch."""
    sizes = QUICK if env.quick else FULL
    repeats = env.repeats.get("generation", 2 if env.quick else 7)
    texts, max_new = prompts(sizes["prompts"]), sizes["max_new_tokens"]
    model, tok, targets = tiny_llama(sizes["model"], env)
    merged = merge_all(copy.deepcopy(model)).eval()
    fns = {
        "batch1": _pass(make_generate(model, tok, batch_size=1, progress=False), texts, max_new),
        f"batch{BATCH}": _pass(make_generate(model, tok, batch_size=BATCH, progress=False), texts, max_new),
        f"batch{BATCH}_merged": _pass(make_generate(merged, tok, batch_size=BATCH, progress=False), texts, max_new),
    }
    notes = []
    with ExitStack() as servers:
        if env.quick:
            notes.append("endpoint: not measured in --quick (starting transformers serve takes tens of seconds)")
        else:
            n = len(texts)
            fns[f"batch{n}_merged"] = _pass(make_generate(merged, tok, batch_size=n, progress=False), texts, max_new)
            if endpoint is False:
                notes.append("endpoint: not measured (in-process generation only)")
            for name, cb, concurrency in (("endpoint", False, ENDPOINT_CONCURRENCY), ("endpoint_cb", True, n)):
                if endpoint is False:
                    break
                endpoint, why = servers.enter_context(served(merged, tok, env, cb, concurrency))
                if endpoint is None:
                    notes.append(f"{name}: not measured: {why}")
                else:
                    fns[name] = _pass(endpoint, texts, max_new)
        completions = {name: fn() for name, fn in fns.items()}
        sample = call_sampler if env.quick else _sampler  # quick: passes of a few ms, timed by torch's Timer
        times = round_robin({name: sample(fn, env) for name, fn in fns.items()}, repeats)
    throughput = {name: len(texts) / summarize(t)["median"] for name, t in times.items()}
    sec, b = "generation", f"batch{BATCH}"
    where = f"generation ({len(texts)} prompts, {max_new} new tokens)"
    figures: list[Figure] = [
        ratio_figure(
            f"generation/batch{BATCH}_vs_batch1",
            sec,
            f"{where}: examples/s batch {BATCH} / batch 1",
            times,
            "batch1",
            b,
            note="ratio of times batch 1 / batch 8, i.e. the batched speed-up",
        ),
        ratio_figure(
            f"generation/merged_vs_unmerged_batch{BATCH}",
            sec,
            f"{where}: examples/s merged / unmerged LoRA, batch {BATCH}",
            times,
            b,
            f"{b}_merged",
            note="ratio of times unmerged / merged",
        ),
    ]
    in_process = [name for name in times if name.startswith("batch") and name.endswith("_merged")]
    best = min(in_process, key=lambda name: summarize(times[name])["median"])
    served_as = {"endpoint": ("transformers serve", ENDPOINT_CONCURRENCY)}
    served_as["endpoint_cb"] = ("transformers serve --continuous-batching", len(texts))
    for name, (what, in_flight) in served_as.items():
        if name in times:
            label = f"{where}: examples/s {what} / in process ({best}), merged model"
            note = f"ratio of times in process / endpoint; {in_flight} requests in flight"
            figures.append(ratio_figure(f"generation/{name}_vs_in_process", sec, label, times, best, name, note=note))
    rates = ", ".join(f"{name} {rate:.1f}" for name, rate in throughput.items())
    one = fmt_seconds(summarize(times[b])["median"])
    notes.insert(0, f"generation examples/s (median): {rates}; one batch-{BATCH} pass over the prompts takes {one}")
    return {
        "config": {
            "prompts": len(texts),
            "max_new_tokens": max_new,
            "batch_size": BATCH,
            "endpoint_concurrency": ENDPOINT_CONCURRENCY,
            "repeats": repeats,
            "model": {k: v for k, v in model.config.to_dict().items() if k in ("hidden_size", "num_hidden_layers")},
            "adapter": "lora on " + ",".join(targets),
            "dtype": str(env.dtype),
            "greedy": True,
        },
        "examples_per_s": throughput,
        # batching, merging and serving should not change greedy decoding (up to float rounding on near-ties)
        "same_completions": {name: c == completions["batch1"] for name, c in completions.items()},
        "raw": {name: summarize(t) for name, t in times.items()},
        "figures": figures,
        "notes": notes,
    }
