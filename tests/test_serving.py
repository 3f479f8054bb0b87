"""`eval.backend=openai`: generation through an OpenAI-compatible endpoint (evaluation/serving.py, endpoint.py).

A stub engine on 127.0.0.1 (tests/helpers.py's stub-server pattern) checks what is sent (prompts, stop strings,
decoding per engine, seeds, concurrency, the key) and the failure modes (unreachable, model not served, timeouts,
5xx and resets retried, malformed answers, 4xx, a refused key, beams an engine lacks), each before anything is
written. The slow test runs docs/serving.md's CPU recipe as written (a real `transformers serve` on a tiny export)
and compares its records with in-process generation of the same export."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from lightning_ralora.cli.eval import main as eval_main
from lightning_ralora.core.errors import ConfigError
from lightning_ralora.data.tokenizer import byte_tokenizer
from lightning_ralora.evaluation.endpoint import EndpointError
from lightning_ralora.evaluation.gsm8k import REFERENCE_STOP
from lightning_ralora.evaluation.runner import evaluate
from lightning_ralora.evaluation.serving import (
    EndpointGenerate,
    ServedModel,
    ServedTask,
    client_of,
    detect_engine,
    request_seed,
)
from lightning_ralora.run.job import train
from tests.conftest import make_cfg
from tests.helpers import BOS, StubJudge, save_special_tokenizer, serve_judge

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-serving-SECRET-31337"
MODEL = "served-model"


# --- a stub engine ---------------------------------------------------------------------------------------------------
class StubEngine(StubJudge):
    """GET /v1/models lists `server.models`; POST /v1/completions answers in turn as `server.script` says ("ok",
    "503", "timeout", "reset", "not-json", "no-choices", "one-choice", "400", "401-echo"), then "ok": one choice
    per `n`, the text `reply(prompt)` + `server.suffix`. Records every request (`server.requests`) and the most
    requests in flight (`server.peak`)."""

    def do_GET(self) -> None:  # noqa: N802
        """GET /v1/models."""
        self.server.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
        self._send({"object": "list", "data": self.server.models})

    def _raw(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        """POST /v1/completions (and /v1/chat/completions: the judge's, as StubJudge answers it)."""
        if self.path.endswith("/chat/completions"):
            return super().do_POST()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
            server.inflight += 1
            server.peak = max(server.peak, server.inflight)
            step = server.script.popleft() if server.script else "ok"
        try:
            time.sleep(server.delay)
        finally:  # counted out before the answer goes: the client may send its next request once it reads it
            with server.lock:
                server.inflight -= 1
        try:
            if step == "timeout":
                time.sleep(1.0)  # past the client's timeout: it has hung up
                return
            if step == "reset":
                self.close_connection = True  # no answer at all: the client sees the connection drop
                return
            if step.isdigit():
                self._raw(int(step), b'{"error": "busy or bad"}')
            elif step == "401-echo":
                self._raw(401, json.dumps({"error": f"bad key {self.headers.get('Authorization')}"}).encode())
            elif step == "not-json":
                self._raw(200, b"<html>proxy error</html>")
            elif step == "no-choices":
                self._send({"object": "text_completion", "data": []})
            elif step == "one-choice":  # a server that ignores `n`
                self._send({"choices": [{"index": 0, "text": reply(body["prompt"])}]})
            else:
                text = reply(body["prompt"]) + server.suffix
                self._send({"choices": [{"index": i, "text": text} for i in range(int(body.get("n") or 1))]})
        except (BrokenPipeError, ConnectionResetError):
            pass


def reply(prompt: str | list[int]) -> str:
    """The stub's completion of a prompt: a function of the prompt, so every record can be checked."""
    return f" answer to {prompt if isinstance(prompt, str) else len(prompt)} The answer is: 4"


def serve_engine(models: list[dict[str, Any]] | None = None, script: list[str] = (), delay: float = 0.0):
    """The stub engine on a free port (a context manager yielding the server)."""
    cm = serve_judge(StubEngine)
    server = cm.__enter__()
    server.models = models if models is not None else [{"id": MODEL, "object": "model", "owned_by": "vllm"}]
    server.script, server.delay, server.suffix = deque(script), delay, ""
    server.lock, server.inflight, server.peak = threading.Lock(), 0, 0
    server.close = lambda: cm.__exit__(None, None, None)
    return server


@pytest.fixture
def engine():
    server = serve_engine()
    yield server
    server.close()


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def _posts(server: ThreadingHTTPServer) -> list[dict[str, Any]]:
    return [r for r in server.requests if r["method"] == "POST"]


def _cfg(server: ThreadingHTTPServer, **over: Any) -> dict[str, Any]:
    return {"base_url": _url(server), "model": MODEL, "api_key_env": "SERVING_TEST_KEY", "backoff": 0.01, **over}


def _generate(server: ThreadingHTTPServer, engine_name: str = "vllm", tok: Any = None, **kw: Any) -> EndpointGenerate:
    cfg = _cfg(server, **kw.pop("cfg", {}))
    return EndpointGenerate(client_of(cfg), engine_name, tok or byte_tokenizer(), **kw)


# --- what is sent ----------------------------------------------------------------------------------------------------
def test_greedy_requests_carry_the_suites_prompt_stop_and_budget(engine, monkeypatch) -> None:
    monkeypatch.setenv("SERVING_TEST_KEY", KEY)
    engine.suffix = "Question: more"  # the server's text past a stop string is cut, as in process
    gen = _generate(engine, max_new_tokens_cap=16)
    prompts = [f"What is {i} plus 1?" for i in range(5)]
    out = gen(prompts, stop=list(REFERENCE_STOP), max_new_tokens=512)
    assert out == [reply(p) for p in prompts]  # prompt order kept, "Question: more" cut
    posts = _posts(engine)
    assert sorted(r["body"]["prompt"] for r in posts) == sorted(prompts)  # text: the byte tokenizer round-trips
    for r in posts:
        body = r["body"]
        assert body["model"] == MODEL and body["max_tokens"] == 16 and body["temperature"] == 0.0
        assert body["stop"] == list(REFERENCE_STOP) and "n" not in body and "seed" not in body
        assert r["path"] == "/v1/completions" and r["headers"]["Authorization"] == f"Bearer {KEY}"


def test_sampling_sends_in_process_settings_and_a_seed_per_prompt(engine) -> None:
    gen = _generate(engine, seed=7)
    out = gen(["a", "b"], max_new_tokens=8, num_return_sequences=3, do_sample=True, temperature=0.2, top_p=0.95)
    assert out == [reply("a")] * 3 + [reply("b")] * 3  # prompt-major, n per prompt
    bodies = [r["body"] for r in _posts(engine)]
    assert len(bodies) == 2  # vLLM honours n: one request per prompt
    for body in bodies:
        assert (body["n"], body["temperature"], body["top_p"], body["top_k"]) == (3, 0.2, 0.95, 50)  # top_k: HF's
        assert body["seed"] == request_seed(7, body["prompt"], 0)
    assert request_seed(7, "a", 0) != request_seed(7, "b", 0) != request_seed(7, "b", 1)


def test_transformers_serve_gets_one_request_per_sample_and_its_generation_config(engine) -> None:
    """transformers serve ignores `n` and takes its defaults (do_sample too) from the model's generation config:
    one request per sample, each seeded, with do_sample and top_k said in `generation_config`."""
    gen = _generate(engine, "transformers", seed=3)
    assert gen(["p"], max_new_tokens=4, num_return_sequences=2, temperature=0.8) == [reply("p")] * 2
    bodies = [r["body"] for r in _posts(engine)]
    assert sorted(b["seed"] for b in bodies) == sorted(request_seed(3, "p", j) for j in range(2))
    for body in bodies:
        assert "n" not in body and "top_k" not in body and body["temperature"] == 0.8
        assert json.loads(body["generation_config"]) == {"do_sample": True, "top_k": 50}
    engine.requests.clear()
    gen(["p"], max_new_tokens=4)
    assert json.loads(_posts(engine)[0]["body"]["generation_config"]) == {"do_sample": False}


def test_beam_search_where_the_engine_has_it_and_a_refusal_where_not(engine) -> None:
    vllm = _generate(engine, "vllm")
    assert vllm(["q"], max_new_tokens=32, num_beams=4) == [reply("q")]  # the best beam: choice 0
    body = _posts(engine)[-1]["body"]
    assert body["use_beam_search"] is True and body["n"] == 4 and body["temperature"] == 0.0
    with pytest.raises(EndpointError, match="vLLM's beam search applies no stop strings"):
        vllm(["q"], stop=["\n"], num_beams=4)
    hf = _generate(engine, "transformers")
    hf(["q"], max_new_tokens=32, num_beams=4)
    assert json.loads(_posts(engine)[-1]["body"]["generation_config"]) == {"num_beams": 4, "do_sample": False}
    n_posts = len(_posts(engine))
    for name in ("sglang", "openai"):
        with pytest.raises(EndpointError, match=rf"\({name}\) has no beam search \(num_beams=4\)"):
            _generate(engine, name)(["q"], num_beams=4)
    assert len(_posts(engine)) == n_posts  # refused before any request: never sampled instead


def test_prompts_are_sent_as_the_ids_in_process_generation_uses(engine, tmp_path: Path) -> None:
    """A LLaMA-3-style tokenizer (BOS added by its defaults): a plain prompt goes as text (the server adds the one
    BOS), a chat-template prompt that starts with the BOS text goes without it, and a run that encodes without
    special tokens sends the ids (the server would add a BOS); transformers serve, text only, refuses that one."""
    tok = AutoTokenizer.from_pretrained(save_special_tokenizer(tmp_path / "tok", "bos"))
    gen = _generate(engine, tok=tok)
    gen(["plain", f"{BOS}<|user|>hi"])
    assert sorted(r["body"]["prompt"] for r in _posts(engine)) == ["<|user|>hi", "plain"]
    engine.requests.clear()
    no_bos = _generate(engine, tok=tok, add_special_tokens=False)
    no_bos(["plain"])
    assert _posts(engine)[0]["body"]["prompt"] == tok("plain", add_special_tokens=False)["input_ids"]
    with pytest.raises(EndpointError, match="transformers serve takes text prompts only"):
        _generate(engine, "transformers", tok=tok, add_special_tokens=False)(["plain"])


def test_requests_run_concurrently_up_to_eval_concurrency() -> None:
    server = serve_engine(delay=0.2)
    try:
        t0 = time.perf_counter()
        out = _generate(server, concurrency=4)([str(i) for i in range(8)])
        elapsed = time.perf_counter() - t0
        assert out == [reply(str(i)) for i in range(8)]
        assert server.peak == 4 and elapsed < 8 * 0.2  # 4 in flight, never more
    finally:
        server.close()


def test_mt_bench_generates_both_turns_through_the_endpoint(engine, monkeypatch) -> None:
    """MT-Bench through `runner.evaluate` on a ServedModel: turn 1 and turn 2 (built on turn 1's answer) come from
    /v1/completions at FastChat's temperatures (0.7 sampled and seeded, 0 greedy), the judge from the same stub's
    chat route; the records are the suite's own."""
    monkeypatch.setenv("SERVING_TEST_KEY", KEY)
    fixtures = REPO / "tests" / "fixtures"
    cfg = {
        **_cfg(engine),
        "backend": "openai",
        "suites": ["mt_bench"],
        "data_files": str(fixtures / "mt_bench_questions.jsonl"),
    }
    cfg["judge"] = {"base_url": _url(engine), "model": "judge-model", "api_key_env": "SERVING_TEST_KEY",
                    "reference_answers": str(fixtures / "mt_bench_reference_gpt4.jsonl")}  # fmt: skip
    served = ServedModel(ServedTask({"add_special_tokens": True}, 5, byte_tokenizer()))
    metrics = evaluate(served, cfg, None, template="alpaca")["mt_bench"]
    assert metrics["n"] == 8 and metrics["score"] == 5.0  # the stub judge rates every turn [[5]]
    bodies = [r["body"] for r in _posts(engine) if r["path"] == "/v1/completions"]
    assert len(bodies) == 16  # 8 questions, 2 turns
    turn2 = [b for b in bodies if "answer to" in b["prompt"]]
    assert len(turn2) == 8 and all(b["prompt"].count("### Instruction:") == 2 for b in turn2)
    temps = sorted({b["temperature"] for b in bodies})
    assert temps == [0.0, 0.1, 0.7] and all(("seed" in b) == (b["temperature"] > 0) for b in bodies)


def test_engine_detection() -> None:
    assert detect_engine([{"id": "m", "owned_by": "vllm"}]) == "vllm"
    assert detect_engine([{"id": "m", "owned_by": "sglang"}]) == "sglang"
    assert detect_engine([{"id": "RUN/export", "owned_by": "local", "status": {"value": "loaded"}}]) == "transformers"
    assert detect_engine([{"id": "gpt-x", "owned_by": "openai"}]) == "openai"


# --- transient failures are retried; the rest fail at once -----------------------------------------------------------
@pytest.mark.parametrize("failures", [["503", "502"], ["timeout"], ["reset"], ["429"]])
def test_transient_failures_are_retried(failures: list[str]) -> None:
    server = serve_engine(script=failures)
    try:
        out = _generate(server, cfg={"request_timeout": 0.3})(["x"])
        assert out == [reply("x")] and len(_posts(server)) == len(failures) + 1
    finally:
        server.close()


def test_a_failure_that_persists_ends_with_one_line() -> None:
    server = serve_engine(script=["500"] * 3)
    try:
        with pytest.raises(EndpointError) as err:
            _generate(server, cfg={"max_retries": 2})(["x"])
        assert str(err.value) == f"eval.base_url={_url(server)} unreachable (HTTP 500) after 3 attempts"
    finally:
        server.close()


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("not-json", "the answer to POST /completions is not a JSON object: '<html>proxy error</html>'"),
        ("no-choices", "the completions answer has no `choices` list"),
        ("400", 'rejected the request (HTTP 400): {"error": "busy or bad"}'),
        ("401-echo", "refused the API key (HTTP 401); check the environment variable $SERVING_TEST_KEY"),
    ],
)
def test_malformed_or_rejected_answers_fail_at_once(step: str, message: str, monkeypatch) -> None:
    monkeypatch.setenv("SERVING_TEST_KEY", KEY)
    server = serve_engine(script=[step])
    try:
        with pytest.raises(EndpointError, match=re.escape(message)) as err:
            _generate(server)(["x"])
        assert len(_posts(server)) == 1 and KEY not in str(err.value) and "\n" not in str(err.value)
    finally:
        server.close()


def test_fewer_choices_than_asked_is_an_error() -> None:
    server = serve_engine(script=["one-choice"])
    try:
        with pytest.raises(EndpointError, match="has 1 choices with text, asked for 3"):
            _generate(server, "openai")(["x"], num_return_sequences=3, temperature=1.0)
    finally:
        server.close()


# --- the command line: checked before any work, nothing written ------------------------------------------------------
@pytest.fixture
def served_run(tmp_path: Path) -> dict[str, Path]:
    """A run directory holding only its config (the model is on the server), and a GSM8K file."""
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"family": "causal_lm", "tokenizer": "bytes"}, "task": {"name": "sft", "template": "none"}}
    (run / "results.json").write_text(json.dumps({"status": "completed", "config": {**config, "seed": 0}}))
    rows = [{"question": f"What is {i} plus 2?", "answer": f"#### {i + 2}"} for i in range(4)]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"run": run, "data": data}


def _snapshot(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")}


def _served_args(run: dict[str, Path], url: str, *extra: str) -> list[str]:
    return [f"run_dir={run['run']}", "eval=gsm8k", f"eval.data_files={run['data']}", "eval.backend=openai",
            f"eval.base_url={url}", f"eval.model={MODEL}", "eval.backoff=0.01", *extra]  # fmt: skip


def test_cli_scores_through_the_endpoint_without_loading_the_model(served_run, engine, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SERVING_TEST_KEY", KEY)
    eval_main(_served_args(served_run, _url(engine), "eval.api_key_env=SERVING_TEST_KEY"))
    run = served_run["run"]
    records = [json.loads(x) for x in (run / "eval" / "gsm8k.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in records] == [reply(f"What is {i} plus 2?") for i in range(4)]
    assert [r["correct"] for r in records] == [False, False, True, False]  # "The answer is: 4" and gold 2 + 2
    assert set(records[0]) == {"index", "id", "prompt", "completion", "reference", "correct", "extracted", "extract"}
    assert json.loads((run / "eval.json").read_text())["gsm8k"] == {"accuracy": 0.25, "n": 4}
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in engine.requests)
    written = "".join(p.read_text() for p in run.rglob("*") if p.is_file())
    assert KEY not in written and KEY not in "".join(capsys.readouterr())


def _fails_before_anything(served_run, argv: list[str], capsys) -> str:
    before = _snapshot(served_run["run"])
    with pytest.raises(SystemExit) as exc:
        eval_main(argv)
    assert exc.value.code == 2 and _snapshot(served_run["run"]) == before  # nothing written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_unreachable_endpoint_is_one_line_before_any_work(served_run, capsys) -> None:
    with socket.socket() as s:  # a free port with nothing listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    t0 = time.perf_counter()
    err = _fails_before_anything(served_run, _served_args(served_run, url), capsys)
    assert f"eval.base_url={url} unreachable" in err and time.perf_counter() - t0 < 10


def test_cli_model_not_served_is_one_line(served_run, engine, capsys) -> None:
    err = _fails_before_anything(served_run, [*_served_args(served_run, _url(engine)), "eval.model=other"], capsys)
    assert f"eval.model=other is not served at eval.base_url={_url(engine)} (it serves: {MODEL})" in err
    assert _posts(engine) == []


def test_cli_refuses_beams_the_engine_lacks_before_any_request(served_run, engine, tmp_path, capsys) -> None:
    engine.models[0]["owned_by"] = "sglang"
    folder = tmp_path / "commonsense" / "boolq"
    folder.mkdir(parents=True)
    (folder / "test.json").write_text(json.dumps([{"instruction": "Is 2 even?", "answer": "true"}]))
    argv = [*_served_args(served_run, _url(engine)), "eval=commonsense", f"eval.data_files={folder.parent}",
            "eval.subsets=[boolq]"]  # fmt: skip
    err = _fails_before_anything(served_run, argv, capsys)
    assert "eval=commonsense decodes with beam search (num_beams=4)" in err and "(sglang) has none" in err
    assert _posts(engine) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["eval.model=null"], "eval.backend=openai needs eval.model"),
        (["eval.concurrency=0"], "eval.concurrency must be a positive integer"),
        (["eval.engine=tgi"], "eval.engine='tgi' is unknown"),
        (["eval=glue"], "eval=glue is scored on the model's logits"),
    ],
)
def test_cli_bad_settings_are_one_line(served_run, engine, extra: list[str], message: str, capsys) -> None:
    assert message in _fails_before_anything(served_run, [*_served_args(served_run, _url(engine)), *extra], capsys)


def test_training_with_the_openai_backend_is_refused(tmp_path: Path, sft_file: Path) -> None:
    run = tmp_path / "run"
    served = ["eval=gsm8k", "eval.backend=openai", "eval.base_url=http://127.0.0.1:1/v1", "eval.model=m"]
    cfg = make_cfg(run, ["task=sft", f"task.data_files={sft_file}", *served])
    with pytest.raises(ConfigError, match=r"train with export=true, serve RUN/export, then lightning-ralora-eval"):
        train(cfg)
    assert not run.exists()


# --- the docs' CPU recipe against a real transformers serve ----------------------------------------------------------
def _recipe() -> str:
    """docs/serving.md's CPU recipe block, as written."""
    text = (REPO / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    (block,) = [b for b in blocks if b.startswith("# CPU recipe")]
    return block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUMANEVAL = [  # (name, args, doc, body, test): the prompt is the signature, docstring and `body`
    ("add", "a: int, b: int", "Return a + b.", "", "assert candidate(2, 3) == 5"),
    ("neg", "x: int", "Return -x.", "", "assert candidate(4) == -4"),
    ("first", "xs: list", "Return the first item.", "", "assert candidate([7, 8]) == 7"),
    # the prompt ends inside a string that the test closes: the program passes whatever the completion (unless it
    # holds a NUL or closes the string itself), so the pass@1 compared is not zero for want of a capable model
    ("same", "x: int", "Return x.", '    return x\nNOTE = """\n',
     '"""\ndef check(candidate):\n    assert candidate(3) == 3'),
]  # fmt: skip


def _recipe_data(cwd: Path) -> None:
    """train.jsonl (arithmetic facts), gsm8k.jsonl (questions in the training format), humaneval.jsonl and a
    commonsense folder (boolq/test.json)."""
    train_rows = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(8) for b in range(8)]
    gsm8k = [{"question": f"{a}+{b}=", "answer": f"#### {a + b}"} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (0, 7)]]
    humaneval = [
        {"task_id": f"Toy/{i}", "prompt": f'def {name}({args}):\n    """{doc}"""\n{body}', "canonical_solution": "",
         "test": test if test.startswith('"""') else f"def check(candidate):\n    {test}\n", "entry_point": name}
        for i, (name, args, doc, body, test) in enumerate(HUMANEVAL)
    ]  # fmt: skip
    for name, rows in (("train", train_rows), ("gsm8k", gsm8k), ("humaneval", humaneval)):
        (cwd / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    boolq = [{"instruction": f"Please answer true or false. Is {i} even?", "answer": "true" if i % 2 == 0 else "false"}
             for i in range(4)]  # fmt: skip
    (cwd / "commonsense" / "boolq").mkdir(parents=True)
    (cwd / "commonsense" / "boolq" / "test.json").write_text(json.dumps(boolq))


@pytest.mark.slow
def test_docs_cpu_recipe_matches_in_process_generation(tmp_path: Path, capsys) -> None:
    """The recipe (train + export, `transformers serve`, GSM8K, HumanEval and commonsense through the endpoint),
    then the same suites in process on the same export (a copy of the run without checkpoints: lightning-ralora-eval
    loads RUN/export) at eval.batch_size=8: every record and metric identical, greedy (GSM8K, HumanEval: 9 non-empty
    completions of 32 tokens) and 4-beam search (commonsense). The server generates one unpadded prompt at a time,
    in process they go in left-padded batches of 8; on this fp32 CPU model the tokens agree."""
    _recipe_data(tmp_path)
    script = _recipe().replace("PORT=8000", f"PORT={_free_port()}")
    env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    log = (tmp_path / "serve.log").read_text() if (tmp_path / "serve.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}\n{log[-2000:]}"
    assert "gsm8k: accuracy" in done.stdout and "humaneval: pass@1" in done.stdout and "commonsense:" in done.stdout
    run, copy = tmp_path / "runs" / "tiny", tmp_path / "in_process"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "eval", "eval.json"))
    files = f"{{gsm8k:{tmp_path}/gsm8k.jsonl,humaneval:{tmp_path}/humaneval.jsonl,commonsense:{tmp_path}/commonsense}}"
    eval_main([f"run_dir={copy}", "eval=commonsense", "eval.suites=[gsm8k,humaneval,commonsense]",
               f"eval.data_files={files}", "eval.subsets=[boolq]", "eval.max_new_tokens=32",
               "eval.allow_code_execution=true", "eval.batch_size=8"])  # fmt: skip
    capsys.readouterr()
    for suite, n in (("gsm8k", 5), ("humaneval", 4), ("commonsense", 4)):
        served = [json.loads(x) for x in (run / "eval" / f"{suite}.jsonl").read_text().splitlines()]
        local = [json.loads(x) for x in (copy / "eval" / f"{suite}.jsonl").read_text().splitlines()]
        assert len(served) == len(local) == n
        for a, b in zip(served, local, strict=True):
            assert a == b, f"{suite} example {a['id']}: endpoint {a['completion']!r}, in process {b['completion']!r}"
        metrics = json.loads((run / "eval.json").read_text())[suite]
        assert metrics == json.loads((copy / "eval.json").read_text())[suite]
    gsm8k = [json.loads(x) for x in (run / "eval" / "gsm8k.jsonl").read_text().splitlines()]
    assert any(r["completion"] for r in gsm8k)  # the comparison is not one of empty completions
