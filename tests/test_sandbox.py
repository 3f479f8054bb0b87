"""The code sandbox, in both modes (`bwrap`: OS isolation; `guard`: the in-process guard): pass/fail/timeout, the
verdict channel (an early exit is never a pass, the harness calls `check` itself), no network, no deletion outside,
memory, every process gone at the verdict, the refusal where bwrap cannot run (the real eval CLI: exit 2, one line,
nothing written), and the mode recorded in eval.json. Hostile programs: tests/test_sandbox_hostile.py."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_ralora.evaluation import execute_program, execute_programs, sandbox
from lightning_ralora.evaluation.humaneval import HumanEvalSuite
from lightning_ralora.evaluation.sandbox import SandboxUnavailable, bwrap_problem, check_sandbox, unshare_works
from lightning_ralora.run.rehearsal import rehearsal_data
from tests.helpers import pids_named

BWRAP_PROBLEM = bwrap_problem()
needs_bwrap = pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"bwrap unusable here: {BWRAP_PROBLEM}")
MODES = [pytest.param("bwrap", marks=needs_bwrap), "guard"]

ADD_OK = "def add(a, b):\n    return a + b\n"
ADD_WRONG = "def add(a, b):\n    return a - b\n"
CHECK = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


@pytest.mark.parametrize("mode", MODES)
def test_correct_program_passes(mode: str) -> None:
    result = execute_program(ADD_OK + "\nassert add(2, 3) == 5\n", sandbox=mode)
    assert result == sandbox.ExecutionResult(True, "passed", "")


@pytest.mark.parametrize("mode", MODES)
def test_wrong_program_fails_with_detail(mode: str) -> None:
    result = execute_program(ADD_WRONG + "\nassert add(2, 3) == 5\n", sandbox=mode)
    assert not result.passed and result.status == "failed"
    assert result.detail.startswith("exit status 1\n") and result.detail.rstrip().endswith("AssertionError")


@pytest.mark.parametrize("mode", MODES)
def test_the_harness_calls_check_itself(mode: str) -> None:
    """With an entry point, the program's text never calls `check`: the harness does, as its last step."""
    assert execute_program(ADD_OK + CHECK, sandbox=mode, entry_point="add").passed
    wrong = execute_program(ADD_WRONG + CHECK, sandbox=mode, entry_point="add")
    assert wrong.status == "failed" and "in check" in wrong.detail and "AssertionError" in wrong.detail
    no_check = execute_program(ADD_OK, sandbox=mode, entry_point="add")  # a program without the tests' check
    assert no_check.status == "failed" and "KeyError: 'check'" in no_check.detail


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "exit_call",
    [
        "import sys\nsys.exit(0)",
        "exit(0)",
        "quit()",
        "raise SystemExit(0)",
        "import posix\nposix._exit(0)",  # bypasses the guard's os._exit: only the verdict channel stops it
        "import sys\nsys.modules['__main__']._os_exit(0)",
        "import posix\nposix.execv('/bin/true', ['true'])",
        "import posix, signal\nposix.kill(posix.getpid(), signal.SIGKILL)",
    ],
    ids=["sys.exit", "exit", "quit", "SystemExit", "posix._exit", "__main__._os_exit", "execv-true", "kill-self"],
)
def test_early_exit_is_never_a_pass(mode: str, exit_call: str) -> None:
    """A wrong body, then an exit before the tests: "failed", whatever the exit status."""
    result = execute_program(ADD_WRONG + exit_call + "\n" + CHECK, sandbox=mode, entry_point="add")
    assert result.status == "failed" and not result.passed, result


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_is_killed_within_timeout(mode: str) -> None:
    timeout = 1.5
    start = time.monotonic()
    result = execute_program("while True:\n    pass\n", timeout_s=timeout, sandbox=mode)
    elapsed = time.monotonic() - start
    assert result == sandbox.ExecutionResult(False, "timeout", "timed out after 1.5 s")
    assert timeout <= elapsed < timeout + 2.0


@pytest.mark.parametrize(
    "mode,namespace", [pytest.param("bwrap", None, marks=needs_bwrap), ("guard", True), ("guard", False)],
    ids=["bwrap", "guard-unshare", "guard-socket-prelude"],
)  # fmt: skip
def test_cannot_reach_a_local_socket(mode: str, namespace: bool | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if namespace and not unshare_works():
        pytest.skip("unshare -rn does not work on this machine")
    if namespace is not None:
        monkeypatch.setattr(sandbox, "unshare_works", lambda: namespace)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        program = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
        program = program if mode == "bwrap" or namespace else program.replace("_socket", "socket")
        result = execute_program(program, timeout_s=5, sandbox=mode)
        assert result.status == "failed", result
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_probes_are_cached() -> None:
    assert unshare_works() is unshare_works()  # a bool, probed once
    bwrap_problem.cache_clear()
    first = bwrap_problem()
    assert bwrap_problem() is first and bwrap_problem.cache_info().misses == 1  # probed once
    assert first == BWRAP_PROBLEM


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "action",
    [
        "os.remove(TARGET)",
        "os.unlink(TARGET)",
        "shutil.rmtree(os.path.dirname(TARGET))",
        "shutil.move(TARGET, TARGET + '.moved')",
        "os.rename(TARGET, TARGET + '.moved')",
        "os.system('rm -f ' + TARGET)",
        "subprocess.run(['rm', '-f', TARGET])",
        "pathlib.Path(TARGET).unlink()",
    ],
)
def test_cannot_delete_a_file_outside_its_directory(tmp_path: Path, mode: str, action: str) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("precious")
    program = f"import os, pathlib, shutil, subprocess\nTARGET = {str(target)!r}\n{action}\n"
    result = execute_program(program, sandbox=mode)
    assert result.status == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"] and target.read_text() == "precious"


@pytest.mark.parametrize("mode", MODES)
def test_memory_hog_is_stopped_and_caller_unharmed(mode: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    program = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))\n"
    result = execute_program(program, timeout_s=10, memory_mb=256, sandbox=mode)
    assert result.status == "failed" and "MemoryError" in result.detail
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 64 * 1024  # the caller's peak memory grew by less than 64 MiB
    assert execute_program("assert sum(range(10)) == 45", sandbox=mode).passed  # and it keeps working


def test_guard_work_directory_is_removed(tmp_path: Path) -> None:
    report = tmp_path / "cwd.txt"
    program = f"import os\nopen('scratch.txt', 'w').write('x')\nopen({str(report)!r}, 'w').write(os.getcwd())\n"
    assert execute_program(program, sandbox="guard").passed
    workdir = Path(report.read_text())
    assert workdir != Path.cwd() and not workdir.exists()


@needs_bwrap
def test_bwrap_work_directory_is_a_private_capped_tmpfs(tmp_path: Path) -> None:
    """cwd, HOME and TMPDIR are /tmp, a fresh tmpfs per program capped at DISK_MB: the host's /tmp and an earlier
    program's files are not in it; the environment holds only the sandbox's own variables (and bwrap's PWD)."""
    probe = Path("/tmp") / f"ralora_host_probe_{os.getpid()}"
    probe.write_text("host")
    under_tmp = sorted({p.split("/")[2] for p in sandbox._python_dirs() if p.startswith("/tmp/")})  # bind stubs
    try:
        first = "open('left_behind.txt', 'w').write('x')\n"
        assert execute_program(first).passed
        second = (
            "import os\n"
            "assert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'] == '/tmp', os.getcwd()\n"
            f"assert sorted(os.listdir('/tmp')) == {under_tmp!r}, os.listdir('/tmp')\n"
            "st = os.statvfs('/tmp')\n"
            f"assert st.f_blocks * st.f_frsize == {sandbox.DISK_MB} * 1024 * 1024, st.f_blocks * st.f_frsize\n"
            f"assert sorted(os.environ) == {sorted([*sandbox._child_env('/tmp'), 'PWD'])!r}, sorted(os.environ)\n"
        )
        result = execute_program(second)
        assert result.passed, result.detail
    finally:
        probe.unlink()


@pytest.mark.parametrize("mode", MODES)
def test_execute_programs_in_parallel_keeps_order(mode: str) -> None:
    programs = ["assert 1 + 1 == 2", "assert False", "x = 3\nassert x == 3", "while True: pass"]
    results = execute_programs(programs, timeout_s=1.5, workers=2, sandbox=mode)
    assert [r.status for r in results] == ["passed", "failed", "passed", "timeout"]
    assert [r.passed for r in results] == [True, False, True, False]
    assert execute_programs([], sandbox=mode) == []


@needs_bwrap
@pytest.mark.parametrize("timeout_s", [5.0, 1.0], ids=["main-exits", "time-out"])
def test_bwrap_every_process_ends_at_the_verdict(timeout_s: float) -> None:
    """Children, an orphaned grandchild in its own session and a busy child: none is alive (or a zombie) when
    execute_program returns, whether the main process exits (after 0.5 s) or the time-out (1 s) kills it."""
    marker = "rlx" + os.urandom(6).hex()
    program = (
        f"import posix, time\nopen('/proc/self/comm', 'w').write({marker!r})\n"
        "for i in range(8):\n"
        "    if posix.fork() == 0:\n"
        "        if i == 0 and posix.fork() == 0:\n"
        "            posix.setsid()\n"
        "        time.sleep(60)\n"
        "        posix._exit(0)\n"
        "time.sleep(0.5)\n"
        f"time.sleep({0 if timeout_s > 1 else 60})\n"
    )
    result = execute_program(program, timeout_s=timeout_s)
    assert result.status == ("passed" if timeout_s > 1 else "timeout"), result
    assert pids_named(marker) == []


@needs_bwrap
def test_bwrap_without_pidfd_still_times_out_and_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where os.pidfd_open is missing (old kernel or Python), a time-out kills bwrap itself at once and its
    --die-with-parent takes the namespace down shortly after (asynchronously: polled for up to 2 s)."""
    marker = "rlx" + os.urandom(6).hex()
    monkeypatch.delattr(os, "pidfd_open")
    start = time.monotonic()
    program = f"import posix, time\nopen('/proc/self/comm', 'w').write({marker!r})\nposix.fork()\ntime.sleep(60)\n"
    result = execute_program(program, timeout_s=1.0)
    assert result.status == "timeout" and time.monotonic() - start < 3.0
    deadline = time.monotonic() + 2.0
    while pids_named(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_named(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_crashing_sandbox_fails_its_own_example_only(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second launch fails (OSError from Popen), the fourth breaks inside the harness (any exception): those
    programs are failed with the reason, the others pass."""
    real_popen, real_token, calls = subprocess.Popen, sandbox.secrets.token_hex, []

    def popen(*args, **kwargs):
        calls.append("popen")
        if calls.count("popen") == 2:
            raise OSError(24, "Too many open files")
        return real_popen(*args, **kwargs)

    def token_hex(n: int) -> str:
        calls.append("token")
        if calls.count("token") == 4:
            raise RuntimeError("no entropy")
        return real_token(n)

    unshare_works()  # the probes (cached) start processes of their own: before the count
    monkeypatch.setattr(sandbox.subprocess, "Popen", popen)
    monkeypatch.setattr(sandbox.secrets, "token_hex", token_hex)
    results = execute_programs(["assert True"] * 5, workers=1, sandbox=mode)
    assert [r.status for r in results] == ["passed", "failed", "passed", "failed", "passed"]
    assert results[1].detail == "the sandbox did not start: [Errno 24] Too many open files"
    assert results[3].detail == "the sandbox failed: RuntimeError: no entropy"


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(SandboxUnavailable, match=r"^eval.sandbox='auto' is unknown; allowed: bwrap, guard$"):
        check_sandbox("auto")
    with pytest.raises(ValueError, match="eval.sandbox='auto' is unknown"):
        HumanEvalSuite(sandbox="auto")


def test_missing_bwrap_is_refused_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.bwrap_problem.cache_clear()
    try:
        problem = sandbox.bwrap_problem()
        assert problem == (
            "eval.sandbox=bwrap needs bubblewrap, and `bwrap` is not on PATH: install it (Debian/Ubuntu: apt-get "
            "install bubblewrap; Fedora: dnf install bubblewrap) or pass eval.sandbox=guard to accept the weaker "
            "in-process guard"
        )
        with pytest.raises(SandboxUnavailable) as err:
            execute_program("assert True")
        assert str(err.value) == problem
        assert HumanEvalSuite(sandbox="guard").sandbox == "guard"  # the explicit opt-in still works
    finally:
        sandbox.bwrap_problem.cache_clear()


@pytest.mark.parametrize(
    "version,fails_with,expected",
    [
        ("bubblewrap 0.6.1", None, "eval.sandbox=bwrap needs bubblewrap 0.8.0 or newer, {exe} is 0.6.1: install a "
         "newer bubblewrap or pass eval.sandbox=guard to accept the weaker in-process guard"),
        ("bubblewrap 0.8.0", "bwrap: setting up uid map: Permission denied",
         "eval.sandbox=bwrap: {exe} cannot start a sandbox here (bwrap: setting up uid map: Permission denied); enable "
         "unprivileged user namespaces (sysctl user.max_user_namespaces=10000, kernel.unprivileged_userns_clone=1 on "
         "Debian kernels, kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04+; a container's seccomp "
         "profile must allow them) or pass eval.sandbox=guard to accept the weaker in-process guard"),
    ],
    ids=["too-old", "no-user-namespaces"],
)  # fmt: skip
def test_unusable_bwrap_is_refused_with_what_to_enable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, fails_with: str | None, expected: str
) -> None:
    """A bwrap that is too old, or one that cannot create namespaces (as bwrap answers where unprivileged user
    namespaces are off): one line naming the cause and the fix."""
    exe = tmp_path / "bwrap"
    script = ["#!/bin/sh", f'if [ "$1" = --version ]; then echo "{version}"; exit 0; fi', f"echo '{fails_with}' >&2"]
    exe.write_text("\n".join([*script, "exit 1", ""]))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sandbox.bwrap_problem.cache_clear()
    sandbox._bwrap_args.cache_clear()
    try:
        assert sandbox.bwrap_problem() == expected.format(exe=exe)
    finally:
        sandbox.bwrap_problem.cache_clear()
        sandbox._bwrap_args.cache_clear()


def _eval_cli(tmp_path: Path, path_env: str, *extra: str) -> subprocess.CompletedProcess:
    """The real eval CLI scoring two HumanEval completions (one right, one wrong) without a model."""
    data = rehearsal_data(tmp_path, "humaneval")
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()][:2]
    small = tmp_path / "he.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    completions = tmp_path / "completions.jsonl"
    texts = [rows[0]["canonical_solution"], "    raise NotImplementedError\n"]
    completions.write_text("".join(json.dumps({"completion": c}) + "\n" for c in texts))
    args = [f"run_dir={tmp_path / 'run'}", "eval=humaneval", f"eval.data_files={small}",
            f"eval.completions={completions}", "eval.allow_code_execution=true", *extra]  # fmt: skip
    env = {**os.environ, "PATH": path_env, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.eval", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_refuses_bwrap_where_it_is_missing_and_records_the_guard_opt_in(tmp_path: Path) -> None:
    """PATH without bwrap: exit 2, one line naming what is missing and the opt-in, no eval.json; with
    eval.sandbox=guard the same run scores and eval.json and every record say "guard"."""
    bare = tmp_path / "bin"  # a PATH with no bwrap (and nothing else) on it
    bare.mkdir()
    refused = _eval_cli(tmp_path, str(bare))
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = refused.stderr.strip().splitlines()
    assert lines == [
        "lightning-ralora-eval: eval=humaneval: eval.sandbox=bwrap needs bubblewrap, and `bwrap` is not on PATH: "
        "install it (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) or pass "
        "eval.sandbox=guard to accept the weaker in-process guard"
    ]
    assert not (tmp_path / "run" / "eval.json").exists()
    guarded = _eval_cli(tmp_path, str(bare), "eval.sandbox=guard")
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())["humaneval"]
    assert metrics == {"pass@1": 0.5, "accuracy": 0.5, "n": 2, "sandbox": "guard"}
    records = [json.loads(line) for line in (tmp_path / "run" / "eval" / "humaneval.jsonl").read_text().splitlines()]
    assert [(r["correct"], r["sandbox"]) for r in records] == [(True, "guard"), (False, "guard")]


@needs_bwrap
def test_cli_default_is_bwrap_and_recorded(tmp_path: Path) -> None:
    result = _eval_cli(tmp_path, os.environ["PATH"])
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())["humaneval"]
    assert metrics == {"pass@1": 0.5, "accuracy": 0.5, "n": 2, "sandbox": "bwrap"}
