"""Run untrusted generated programs (HumanEval-style) and take a verdict no program can fake.

Two modes (`eval.sandbox`):

- `bwrap` (the default): OS isolation with bubblewrap (0.8 or newer). Each program runs in its own user, PID,
  network, mount, IPC, UTS and cgroup namespaces (`--unshare-all`; nested user namespaces disabled), with every
  capability dropped, a cleared environment (a few fixed variables only), and a filesystem that is read-only except
  a private tmpfs at /tmp (its cwd, HOME and TMPDIR) capped at `DISK_MB` in total. What it sees of the host is
  /usr, the /bin, /sbin and /lib* links or folders, the dynamic linker's /etc/ld.so.* files and the interpreter's
  own prefixes (sys.prefix, sys.base_prefix and the exec prefixes), read-only: not /root, /home, the caller's cwd,
  run dir or /tmp. /proc is a fresh mount of its PID namespace (the caller's processes are not in it), /dev is
  bwrap's minimal one (null, zero, full, random, urandom, tty, pts), read-only. The network namespace has only its
  own loopback. bwrap's init is PID 1 there; when the program's main process exits, or at the time-out, the harness
  SIGKILLs that init and waits for it: the kernel kills every process of the namespace first, so none outlives the
  verdict; `--die-with-parent` takes the sandbox down with the evaluator. No signal from inside reaches the
  evaluator: it is not in the namespace.
- `guard`: the weaker in-process guard, an explicit opt-in (recorded in eval.json): a fresh `python -I` in its own
  session in a throw-away host directory, no inherited environment, under `unshare -rn` (no network) when that
  works here, else with `socket` disabled. Orphans that leave its session (os.setsid) can outlive the verdict.

Both modes set resource limits in the child before the program runs, soft = hard: address space and data
(`memory_mb`), CPU seconds (timeout + 1), file size (`FSIZE_MB`, stderr included), open files (`NOFILE`), no core
dumps, and processes (`NPROC`). RLIMIT_NPROC counts per user in the sandbox's user namespace and binds a non-root
evaluator; the kernel exempts uid 0, so when the evaluator runs as root a fork bomb is bounded by the time-out, each
process by the memory limit, and all of them end at the verdict. Both modes also keep the block-list prelude of
human-eval's `reliability_guard` (file removal, os.system/exec*/fork/kill, subprocess, exit, ...): it keeps our
verdicts equal to human-eval's on programs that call these, and it is cheap defence in depth.

The verdict channel: the evaluator gives the child a fresh random nonce with the program (on stdin, which the prelude
reads to its end and closes before the program runs) and an inherited report pipe. The prelude runs the program (and
tests) in a fresh `__main__` module, then the harness's own `check(entry_point)` as its last step, and only then
writes the nonce to the report pipe and exits 0. "passed" = the nonce came back AND exit status 0 AND no time-out,
so an early exit (os._exit(0), posix._exit(0), sys.exit(0), execv('/bin/true'), a kill) is never a pass.
Residual risk: the program runs in the prelude's interpreter, so a program that reads the prelude's memory (its
frames, `gc`) could find the nonce and forge a pass, and a program can return objects whose `==` is always true;
no sandbox closes that, the tests' assertions are only as strong as the objects they compare. No cgroup bounds the
sandbox as a whole: memory outside a process's address space is bounded by the tmpfs cap (files), `NOFILE` x
`FSIZE_MB` (memfd files) and, for SysV shared memory segments, only by the time-out (they go with the sandbox's IPC
namespace). docs/sandbox.md describes all of this.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Literal

Status = Literal["passed", "failed", "timeout"]
SANDBOXES: tuple[str, ...] = ("bwrap", "guard")

FSIZE_MB = 16  # largest file a program may write (its stderr included)
DISK_MB = 64  # bwrap mode: the whole writable tmpfs (/tmp, the program's cwd), all files together
NOFILE = 256  # open files per process
NPROC = 256  # processes per sandbox (binds a non-root evaluator; see the module docstring)
BWRAP_MIN_VERSION = (0, 8, 0)  # --disable-userns (0.8), --size for --tmpfs (0.7)
_DETAIL_CHARS = 2000  # tail of stderr kept in the result
_KILL_WAIT_S = 10.0  # how long a killed sandbox may take to go away

# Runs in the child as `python -I -c _PRELUDE mem cpu fsize nofile nproc nonet report_fd`; stdin holds
# "<nonce>\n<entry point or empty>\n<program>". Everything lives in _main's frame, not in module globals.
_PRELUDE = r"""
def _main():
    import sys
    data = sys.stdin.buffer.read()
    import os
    _null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(_null, 0)
    os.close(_null)
    nonce, entry, src = data.split(b"\n", 2)
    del data
    entry, src = entry.decode(), src.decode("utf-8")
    mem, cpu, fsize, nofile, nproc = (int(a) for a in sys.argv[1:6])
    nonet, report = sys.argv[6] == "1", int(sys.argv[7])
    import resource
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass
    import builtins, faulthandler, shutil, subprocess, traceback, types
    faulthandler.disable()
    os_exit, os_write, os_close = os._exit, os.write, os.close

    def disabled(name):
        def blocked(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return blocked

    def no_exit(*args, **kwargs):
        raise SystemExit("exit() is disabled in the sandbox")

    builtins.exit = builtins.quit = sys.exit = no_exit
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "ftruncate",
                 "system", "popen", "kill", "killpg", "fork", "forkpty", "vfork", "_exit", "abort", "chmod", "fchmod",
                 "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid", "setgid", "seteuid",
                 "setegid", "setreuid", "setregid", "setresuid", "setresgid", "link", "symlink", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "plock", "mkfifo",
                 "mknod"):
        if hasattr(os, name):
            setattr(os, name, disabled("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled("shutil." + name))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, disabled("subprocess." + name))
    if nonet:
        import socket
        for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
            setattr(socket, name, disabled("socket." + name))
    for mod in ("resource", "psutil", "ctypes", "_ctypes", "multiprocessing", "joblib", "tkinter", "ipdb", "pty"):
        sys.modules[mod] = None
    builtins.__dict__.pop("help", None)
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    try:
        exec(compile(src, "program.py", "exec"), main.__dict__)
        if entry:
            main.__dict__["check"](main.__dict__[entry])
    except BaseException:
        try:
            traceback.print_exc()
            sys.stdout.flush(); sys.stderr.flush()
        finally:
            os_exit(1)
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
    os_write(report, nonce)
    os_close(report)
    os_exit(0)

_main()
"""


class SandboxUnavailable(ValueError):
    """The requested sandbox cannot run on this machine (a ValueError: a bad `eval.sandbox` for this host)."""


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one program: `passed` iff `status == "passed"`; `detail` holds the error tail or reason."""

    passed: bool
    status: Status
    detail: str = ""


@functools.lru_cache(maxsize=1)
def unshare_works() -> bool:
    """Whether `unshare -rn` (user + network namespace, no root needed) can start Python here (probed once)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        proc = subprocess.run(
            [exe, "-rn", sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _child_env(home: str) -> dict[str, str]:
    """A minimal environment: no inherited secrets, one thread per math library, HOME and TMPDIR = `home`."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }


def _python_dirs() -> list[str]:
    """The interpreter's own folders (prefixes, the real executable's folder), outermost first, without those
    already under another one or under /usr; "/" never (it would expose the whole host)."""
    exe = os.path.realpath(sys.executable)
    found = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, os.path.dirname(exe)}
    found |= {os.path.realpath(p) for p in found}
    dirs: list[str] = []
    for path in sorted(os.path.normpath(p) for p in found if p and os.path.isdir(p)):
        if path != "/" and not any(path == d or path.startswith(d.rstrip("/") + "/") for d in ["/usr", *dirs]):
            dirs.append(path)
    return dirs


@functools.lru_cache(maxsize=1)
def _bwrap_args() -> tuple[str, ...]:
    """bwrap's command line up to the program (namespaces, read-only binds, tmpfs, /proc, /dev, environment)."""
    args = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns"]
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    for key, value in _child_env("/tmp").items():
        args += ["--setenv", key, value]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        args += ["--ro-bind-try", etc, etc]
    args += ["--size", str(DISK_MB * 1024 * 1024), "--tmpfs", "/tmp"]  # first: a venv under the host's /tmp stays
    for path in _python_dirs():
        args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
    return tuple(args)


def _bwrap_version(exe: str) -> tuple[int, ...] | None:
    """`bwrap --version` as numbers (None when it does not answer)."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g or 0) for g in match.groups()) if match else None


_GUARD_HINT = "or pass eval.sandbox=guard to accept the weaker in-process guard"


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> str | None:
    """Why `eval.sandbox=bwrap` cannot run here (one line naming what is missing and how to enable it), or None.
    Probed once: the real sandbox runs a trivial program and must report a pass."""
    if not sys.platform.startswith("linux"):
        return f"eval.sandbox=bwrap needs Linux (bubblewrap namespaces); this is {sys.platform}; {_GUARD_HINT}"
    exe = shutil.which("bwrap")
    if exe is None:
        return (
            "eval.sandbox=bwrap needs bubblewrap, and `bwrap` is not on PATH: install it (Debian/Ubuntu: apt-get "
            f"install bubblewrap; Fedora: dnf install bubblewrap) {_GUARD_HINT}"
        )
    version = _bwrap_version(exe)
    wanted = ".".join(map(str, BWRAP_MIN_VERSION))
    if version is not None and version < BWRAP_MIN_VERSION:
        return (
            f"eval.sandbox=bwrap needs bubblewrap {wanted} or newer, {exe} is {'.'.join(map(str, version))}: "
            f"install a newer bubblewrap {_GUARD_HINT}"
        )
    result = _run_one("pass", "", 20.0, 256, "bwrap")
    if result.passed:
        return None
    reason = (result.detail.strip().splitlines() or [result.status])[-1][:300]
    return (
        f"eval.sandbox=bwrap: {exe} cannot start a sandbox here ({reason}); enable unprivileged user namespaces "
        "(sysctl user.max_user_namespaces=10000, kernel.unprivileged_userns_clone=1 on Debian kernels, "
        f"kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04+; a container's seccomp profile must allow "
        f"them) {_GUARD_HINT}"
    )


def check_sandbox(sandbox: str) -> str:
    """`sandbox` if it is a known mode that can run here; SandboxUnavailable (one line) otherwise."""
    if sandbox not in SANDBOXES:
        raise SandboxUnavailable(f"eval.sandbox={sandbox!r} is unknown; allowed: {', '.join(SANDBOXES)}")
    problem = bwrap_problem() if sandbox == "bwrap" else None
    if problem:
        raise SandboxUnavailable(problem)
    return sandbox


def _tail(f: IO[bytes]) -> str:
    """The last `_DETAIL_CHARS` characters of a (possibly large) output file."""
    try:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _DETAIL_CHARS))
        return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until `proc` exits, without reaping it (its pid and process group stay reserved); False on time-out."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel or Python): poll
        pidfd = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:  # already reaped
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _open_init(proc: subprocess.Popen, info_r: int, wait_s: float) -> int | None:
    """A pidfd of the sandbox's init (bwrap's PID 1, named on its --info-fd), or None when there is none any more
    (the sandbox never started, or its init and so its namespace are already gone) or no pidfd support."""
    chunks = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and select.select([info_r], [], [], deadline - time.monotonic())[0]:
        chunk = os.read(info_r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    try:
        init = int(json.loads(b"".join(chunks))["child-pid"])
        pidfd = os.pidfd_open(init)
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return None
    try:  # the pidfd is the init's iff that pid is still bwrap's child (bwrap, unreaped, starts no other child)
        with open(f"/proc/{init}/stat", encoding="utf-8", errors="replace") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                return pidfd
    except (OSError, ValueError, IndexError):
        pass
    os.close(pidfd)
    return None


def _end_namespace(init_fd: int | None) -> None:
    """SIGKILL the sandbox's init and wait until it is gone: the kernel kills every other process of its PID
    namespace before the init's exit completes, so nothing the program started outlives this call."""
    if init_fd is None:
        return
    try:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(init_fd, signal.SIGKILL)
        select.select([init_fd], [], [], _KILL_WAIT_S)
    finally:
        os.close(init_fd)


def _run_one(program: str, entry_point: str, timeout_s: float, memory_mb: int, sandbox: str) -> ExecutionResult:
    """One program in a fresh sandbox of mode `sandbox` (assumed usable); see the module docstring."""
    nonce = secrets.token_hex(16)
    nonet = sandbox == "guard" and not unshare_works()
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="ralora_sandbox_") if sandbox == "guard" else None
        if workdir:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        stdin, err = stack.enter_context(tempfile.TemporaryFile()), stack.enter_context(tempfile.TemporaryFile())
        stdin.write(f"{nonce}\n{entry_point}\n".encode() + program.encode("utf-8", errors="surrogatepass"))
        stdin.seek(0)
        limits = [memory_mb * 1024 * 1024, max(1, math.ceil(timeout_s) + 1), FSIZE_MB * 1024 * 1024, NOFILE, NPROC]
        if sandbox == "bwrap":
            prefix = list(_bwrap_args())
        else:
            prefix = [] if nonet else [shutil.which("unshare") or "unshare", "-rn"]
        report_r, report_w = _pipe(stack)  # from here to Popen nothing raises: the write ends are closed below
        info_r, info_w = _pipe(stack) if sandbox == "bwrap" else (-1, -1)
        if sandbox == "bwrap":
            prefix[1:1] = ["--info-fd", str(info_w)]
        args = [*prefix, sys.executable, "-I", "-c", _PRELUDE, *map(str, limits), str(int(nonet)), str(report_w)]
        try:
            proc = subprocess.Popen(
                args,
                cwd=workdir,
                env=_child_env(workdir or "/tmp"),
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                close_fds=True,
                pass_fds=(report_w,) if info_w < 0 else (report_w, info_w),
            )
        except OSError as exc:
            return ExecutionResult(False, "failed", f"the sandbox did not start: {exc}")
        finally:  # the child holds its own copies: ours must not keep the pipes open
            os.close(report_w)
            if info_w >= 0:
                os.close(info_w)
        start = time.monotonic()
        init_fd = _open_init(proc, info_r, timeout_s + _KILL_WAIT_S) if sandbox == "bwrap" else None
        timed_out = not _wait_exit(proc, max(0.0, timeout_s - (time.monotonic() - start)))
        if init_fd is not None:
            _end_namespace(init_fd)  # the program's main process exited, or the time-out
        elif sandbox == "bwrap" and timed_out:  # no pidfd: bwrap's --die-with-parent takes its init down
            proc.kill()
        if sandbox == "guard":  # the leader is unreaped, so its process group cannot be a reused pid's
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        elif not _wait_exit(proc, _KILL_WAIT_S):  # bwrap exits once its init is gone
            proc.kill()
        returncode = proc.wait()
        elapsed = time.monotonic() - start
        report = _read_ready(report_r)
        if timed_out:
            return ExecutionResult(False, "timeout", f"timed out after {timeout_s:g} s")
        if returncode == 0 and report == nonce.encode():
            return ExecutionResult(True, "passed", "")
        return ExecutionResult(False, "failed", _failure(returncode, report, nonce, _tail(err).strip(), elapsed))


def _pipe(stack: contextlib.ExitStack) -> tuple[int, int]:
    """A pipe whose read end `stack` closes (the caller closes the write end once the child holds it)."""
    r, w = os.pipe()
    stack.callback(os.close, r)
    return r, w


def _read_ready(fd: int) -> bytes:
    """What a pipe holds now (at most 64 KiB), without waiting for more."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536)
    except (BlockingIOError, OSError):
        return b""


def _failure(returncode: int, report: bytes, nonce: str, stderr: str, elapsed: float) -> str:
    """The detail of a failed verdict: stderr's tail, and why the exit was not a pass."""
    if returncode < 0 or returncode > 128:
        signum = -returncode if returncode < 0 else returncode - 128
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        reason = f"killed by {name} after {elapsed:.2f} s"
    elif returncode == 0 and report != nonce.encode():
        reason = "exit status 0 before the harness's check completed (an early exit is never a pass)"
    else:
        reason = f"exit status {returncode}"
    return f"{reason}\n{stderr}" if stderr else reason


def execute_program(
    program: str,
    timeout_s: float = 3.0,
    memory_mb: int = 1024,
    sandbox: str = "bwrap",
    entry_point: str | None = None,
) -> ExecutionResult:
    """Run `program` in a fresh sandbox (`sandbox`: bwrap | guard); with `entry_point`, the harness then calls
    `check(<entry_point>)` itself. Passed iff the program and that check completed (the nonce came back), exit
    status 0, within the time-out. SandboxUnavailable when the mode cannot run here."""
    check_sandbox(sandbox)
    return _run_one(program, entry_point or "", timeout_s, memory_mb, sandbox)


def execute_programs(
    programs: Sequence[str],
    timeout_s: float = 3.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    sandbox: str = "bwrap",
    entry_points: Sequence[str | None] | None = None,
) -> list[ExecutionResult]:
    """Run many programs in parallel (a thread pool of sandbox launchers); results in input order. A sandbox that
    crashes gives that program a failed verdict with the reason; the others are unaffected."""
    if not programs:
        return []
    check_sandbox(sandbox)
    entries = list(entry_points) if entry_points is not None else [None] * len(programs)
    if len(entries) != len(programs):
        raise ValueError(f"{len(entries)} entry points for {len(programs)} programs")

    def one(i: int) -> ExecutionResult:
        try:
            return _run_one(programs[i], entries[i] or "", timeout_s, memory_mb, sandbox)
        except Exception as exc:  # noqa: BLE001 - one broken sandbox fails its own example, never the evaluation
            return ExecutionResult(False, "failed", f"the sandbox failed: {type(exc).__name__}: {exc}")

    workers = workers or max(1, min(len(programs), os.cpu_count() or 1))
    if workers == 1:
        return [one(i) for i in range(len(programs))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(programs))))
