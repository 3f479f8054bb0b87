"""Hostile completions against the bwrap sandbox: each is a small program that tries to fake a pass, break out, read
the caller's secrets, reach the network, flood memory, disk or output, or leave processes behind. For each one the
test asserts, against what it observes itself: the attack was contained (canary files unchanged, nothing created,
nothing received by the test's listeners, no secret echoed back), the verdict is the expected one (never a fake
pass), the evaluator survived and returned its verdict, and no process of the program is left afterwards.

The evaluator is a child of the test (a small script that loads sandbox.py and calls `execute_program`), so a
signal aimed at "the parent" can never reach the test runner; every program first names itself (/proc/self/comm)
with a marker unique to the attack, which its forks inherit, and the processes left are those carrying it. No
attack signals anything but its own processes or the sandbox's init, and the fork bomb is bounded by the program.

`python -m tests.test_sandbox_hostile` prints the table (markdown); `--guard` adds the guard mode's column."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lightning_ralora.evaluation import sandbox as _sandbox
from tests.helpers import pids_named

SANDBOX_PY = Path(_sandbox.__file__).resolve()  # the evaluator script loads this file alone (stdlib only)

BWRAP_PROBLEM = _sandbox.bwrap_problem()
pytestmark = pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"bwrap unusable here: {BWRAP_PROBLEM}")

ENV_SECRET = "RALORA_TEST_SECRET_TOKEN"
# the evaluator: load sandbox.py, run one program, print the verdict and its own peak memory (KiB; VmHWM, not
# ru_maxrss, which keeps the test runner's peak across fork + exec)
EVALUATOR = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("ralora_sandbox", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["ralora_sandbox"] = mod
spec.loader.exec_module(mod)
job = json.loads(sys.stdin.read())
r = mod.execute_program(job["program"], job["timeout_s"], job["memory_mb"], job["sandbox"], job["entry_point"])
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])  # this mm's, in KiB
print(json.dumps({"passed": r.passed, "status": r.status, "detail": r.detail, "peak_kib": peak}))
"""
WRONG_ADD = "def add(a, b):\n    return a - b\n"  # a wrong body: any pass with it is a fake
RIGHT_ADD = "def add(a, b):\n    return a + b\n"
CHECK = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


@dataclass
class Arena:
    """What the test puts around one attack: a canary file, a secret under HOME, an env secret, listeners on TCP,
    UDP, a Unix socket under the test's folder and an abstract Unix socket, and the attack's process marker."""

    root: Path
    marker: str = field(default_factory=lambda: "rlx" + secrets.token_hex(6))
    secret: str = field(default_factory=lambda: "canary-" + secrets.token_hex(8))

    def __post_init__(self) -> None:
        self.canary = self.root / "canary.txt"
        self.canary.write_text("precious")
        self.home = self.root / "home"
        self.home.mkdir()
        (self.home / ".netrc").write_text(f"machine example.com password {self.secret}\n")
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = self.root / "s.sock"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(str(self.unix_path))
        self.unix.listen(8)
        self.abstract_name = "\0ralora-test-" + self.marker
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind(self.abstract_name)
        self.abstract.listen(8)
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.setblocking(False)

    def header(self) -> str:
        """The constants an attack program uses, and its first act: name itself with the marker."""
        consts = {
            "MARK": self.marker,
            "CANARY": str(self.canary),
            "HOME_SECRET": str(self.home / ".netrc"),
            "SECRET": self.secret,
            "HOST_DIR": str(self.root),
            "TCP_PORT": self.tcp.getsockname()[1],
            "UDP_PORT": self.udp.getsockname()[1],
            "UNIX_PATH": str(self.unix_path),
            "ABSTRACT": self.abstract_name,
        }
        lines = [f"{k} = {v!r}" for k, v in consts.items()]
        return "\n".join(lines) + "\nopen('/proc/self/comm', 'w').write(MARK)\n"

    def received(self) -> list[str]:
        """What reached the test's listeners (connections accepted, datagrams received)."""
        got = []
        for name, s in (("tcp", self.tcp), ("unix", self.unix), ("abstract", self.abstract)):
            try:
                conn, _ = s.accept()
                conn.close()
                got.append(name)
            except (BlockingIOError, OSError):
                pass
        with contextlib.suppress(BlockingIOError, OSError):
            got.append("udp:" + self.udp.recv(4096).decode(errors="replace"))
        return got

    def close(self) -> None:
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()


@dataclass(frozen=True)
class Attack:
    """One hostile completion: `body` runs after the arena's header (with `add` and `check` around it when
    `entry_point`); `verdicts` are the acceptable ones; `breach` names what escaped, from the test's own view."""

    name: str
    what: str
    body: str
    verdicts: tuple[str, ...] = ("failed",)
    breach: Callable[[Arena, dict], list[str]] = lambda arena, verdict: []
    timeout_s: float = 3.0
    memory_mb: int = 512
    entry_point: bool = True
    wrong: bool = False  # the body goes with a wrong `add`: a "passed" would be a fake


def _canary_changed(arena: Arena, verdict: dict) -> list[str]:
    text = arena.canary.read_text() if arena.canary.exists() else None
    return [] if text == "precious" else [f"the canary file is now {text!r}"]


def _outside_targets(arena: Arena) -> list[Path]:
    """Where "create files outside" tries to write (a harmless file named by the marker): the caller's folder, /,
    /usr, /dev/shm and the interpreter's site-packages (a .pth file, which Python reads at every start)."""
    site = Path(sysconfig.get_paths()["purelib"])
    return [Path(d) / f"{arena.marker}.txt" for d in (arena.root, "/", "/usr", "/dev/shm")] + [
        site / f"{arena.marker}.pth"
    ]


def _created_outside(arena: Arena, verdict: dict) -> list[str]:
    """The targets that exist on the host (removed again: they are this test's own files)."""
    found = [p for p in _outside_targets(arena) if p.exists()]
    for p in found:
        p.unlink()
    return [f"created {p}" for p in found]


def _secret_echoed(arena: Arena, verdict: dict) -> list[str]:
    return ["the secret came back in the verdict"] if arena.secret in verdict["detail"] else []


def _listeners(arena: Arena, verdict: dict) -> list[str]:
    return [f"the test's listener got {g}" for g in arena.received()]


def _wrote_at_most(limit_mb: int) -> Callable[[Arena, dict], list[str]]:
    def breach(arena: Arena, verdict: dict) -> list[str]:
        written = [int(w) for w in _numbers_after("wrote ", verdict["detail"])]
        if not written:
            return ["the program did not report what it wrote"]
        return [f"wrote {written[-1]} bytes > {limit_mb} MiB"] if written[-1] > limit_mb * 1024 * 1024 else []

    return breach


def _started_at_least(n: int) -> Callable[[Arena, dict], list[str]]:
    def breach(arena: Arena, verdict: dict) -> list[str]:
        started = [int(s) for s in _numbers_after("started ", verdict["detail"])]
        return [] if started and started[-1] >= n else [f"the attack did not run (started {started})"]

    return breach


def _numbers_after(prefix: str, text: str) -> list[str]:
    out = []
    for part in text.split(prefix)[1:]:
        digits = "".join(c for c in part[:20] if c.isdigit() or c == " ").split()
        if digits:
            out.append(digits[0])
    return out


def _peak_under(mb: int) -> Callable[[Arena, dict], list[str]]:
    def breach(arena: Arena, verdict: dict) -> list[str]:
        return [f"evaluator peak {verdict['peak_kib'] // 1024} MiB"] if verdict["peak_kib"] > mb * 1024 else []

    return breach


def _all(*checks: Callable[[Arena, dict], list[str]]) -> Callable[[Arena, dict], list[str]]:
    return lambda arena, verdict: [b for c in checks for b in c(arena, verdict)]


FORK_CHILDREN = (
    "import posix, time\n"
    "def spawn(n, setsid=False):\n"
    "    for _ in range(n):\n"
    "        if posix.fork() == 0:\n"
    "            if setsid:\n"
    "                posix.setsid()\n"
    "                if posix.fork() != 0:\n"
    "                    posix._exit(0)\n"
    "            time.sleep(120)\n"
    "            posix._exit(0)\n"
)

ATTACKS: list[Attack] = [
    # --- fake passes: a wrong body, then an exit before the tests
    Attack("fake-pass posix._exit(0)", "wrong body, then posix._exit(0)", "import posix\nposix._exit(0)\n", wrong=True),
    Attack("fake-pass __main__._os_exit", "the old prelude's exit via sys.modules['__main__']",
           "import sys\nsys.modules['__main__']._os_exit(0)\n", wrong=True),
    Attack("fake-pass SystemExit(0)", "raise SystemExit(0) around the patched sys.exit", "raise SystemExit(0)\n",
           wrong=True),
    Attack("fake-pass execv /bin/true", "replace the process with /bin/true (exit 0)",
           "import posix\nposix.execv('/bin/true', ['true'])\n", wrong=True),
    Attack("fake-pass forged report", "write 'passed'-like bytes to every open fd, then exit 0",
           "import posix\nfor fd in range(3, 64):\n    try:\n        posix.write(fd, b'0' * 32)\n    except OSError:\n"
           "        pass\nposix._exit(0)\n", wrong=True),
    Attack("fake-pass kill self", "SIGKILL itself before the tests",
           "import posix, signal\nposix.kill(posix.getpid(), signal.SIGKILL)\n", wrong=True),
    # --- guard bypasses against the caller's files
    Attack("posix.unlink canary", "delete a file of the caller (posix.unlink bypasses os.unlink)",
           "import posix\nposix.unlink(CANARY)\n", breach=_canary_changed),
    Attack("open(w) canary", "truncate and overwrite a file of the caller", "open(CANARY, 'w').write('pwned')\n",
           breach=_canary_changed),
    Attack("create files outside", "create a file in the caller's folder, /, /usr and /dev/shm",
           "ok = []\nfor d in (HOST_DIR, '/', '/usr', '/dev/shm'):\n    try:\n"
           "        open(f'{d}/{MARK}.txt', 'w').write('x')\n        ok.append(d)\n    except OSError:\n"
           "        pass\nassert False, f'created in {ok}'\n", breach=_created_outside),
    Attack("poison site-packages", "plant a .pth file in the interpreter's site-packages (run at every start)",
           "import sysconfig\nopen(f\"{sysconfig.get_paths()['purelib']}/{MARK}.pth\", 'w').write('# planted')\n",
           breach=_created_outside),
    # --- processes and signals
    Attack("kill the parent", "SIGKILL os.getppid() (in bwrap: the sandbox's init, PID 1; in guard: the evaluator)",
           "import posix, signal, time\nposix.kill(posix.getppid(), signal.SIGKILL)\n"
           "time.sleep(0.2)\nassert False, 'still here'\n"),
    Attack("orphans outlive the verdict", "fork 20 children that sleep, then pass",
           FORK_CHILDREN + "spawn(20)\nprint('started 20', file=__import__('sys').stderr)\n", verdicts=("passed",)),
    Attack("setsid grandchild", "a grandchild in its own session (os.setsid) then a time-out",
           FORK_CHILDREN + "spawn(3, setsid=True)\ntime.sleep(60)\n", verdicts=("timeout",), timeout_s=1.5),
    Attack("fork bomb (bounded: 300)", "fork 300 sleeping children as fast as possible",
           FORK_CHILDREN + "spawn(300)\nassert False, 'started 300'\n", breach=_started_at_least(300),
           timeout_s=10.0),
    # --- secrets of the caller
    Attack("read HOME secret", "read ~/.netrc and the caller's file by its absolute path",
           "import os\nfound = []\nfor p in (os.path.expanduser('~/.netrc'), HOME_SECRET):\n    try:\n"
           "        found.append(open(p).read())\n    except OSError:\n        pass\n"
           "assert any(SECRET in f for f in found), 'no secret'\nraise AssertionError(found)\n",
           breach=_secret_echoed),
    Attack("read env secret", "look for the evaluator's environment variable",
           "import os\nleak = [v for v in os.environ.values() if SECRET in v]\nassert leak, 'no secret'\n"
           "raise AssertionError(leak)\n", breach=_secret_echoed),
    Attack("read /proc/<ppid>/environ", "every /proc/*/environ and cmdline it can see, the parent's first",
           "import os\nfound = []\npids = [os.getppid()] + [p for p in os.listdir('/proc') if p.isdigit()]\n"
           "for pid in pids:\n    for f in ('environ', 'cmdline'):\n        try:\n"
           "            t = open(f'/proc/{pid}/{f}', 'rb').read().decode(errors='replace')\n"
           "        except OSError:\n            continue\n        if SECRET in t:\n            found.append(t)\n"
           "assert found, 'no secret'\nraise AssertionError(found)\n", breach=_secret_echoed),
    # --- network
    Attack("TCP to 127.0.0.1", "connect to the test's TCP listener on the host's loopback",
           "import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', TCP_PORT))\n"
           "s.send(b'escaped')\n"),
    Attack("UDP to 127.0.0.1", "send datagrams to the test's UDP socket",
           "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)\nfor _ in range(5):\n"
           "    s.sendto(b'escaped', ('127.0.0.1', UDP_PORT))\nassert False, 'sent'\n"),
    Attack("Unix socket under tmp_path", "connect to the test's Unix-domain socket by its path",
           "import _socket\ns = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\ns.connect(UNIX_PATH)\n"
           "s.send(b'escaped')\n"),
    Attack("abstract Unix socket", "connect to the test's abstract Unix socket (no file; a network namespace's)",
           "import _socket\ns = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\ns.connect(ABSTRACT)\n"
           "s.send(b'escaped')\n"),
    # --- floods
    Attack("disk flood (total)", "15 MB files (each under the file-size limit) until 300 MB",
           "total = 0\ntry:\n    for i in range(20):\n        with open(f'f{i}', 'wb') as f:\n"
           "            for _ in range(15):\n"
           "                f.write(b'x' * 1048576)\n                total += 1048576\n"
           "except OSError as e:\n    raise AssertionError(f'wrote {total} ({e})')\n"
           "raise AssertionError(f'wrote {total}')\n", breach=_wrote_at_most(_sandbox.DISK_MB)),
    Attack("stdout flood", "write to stdout without end",
           "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
           verdicts=("timeout",), timeout_s=2.0, breach=_peak_under(200)),
    Attack("stderr flood", "write 100 MB to stderr (the kept detail is a tail)",
           "import sys\nfor _ in range(1600):\n    sys.stderr.write('y' * 65536)\n",
           breach=lambda arena, verdict: ["detail too long"] if len(verdict["detail"]) > 2200 else []),
    Attack("memory hog", "allocate 64 MB blocks without end (limit 256 MB)",
           "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))\n", memory_mb=256,
           breach=_all(_peak_under(200), lambda arena, verdict: [] if "MemoryError" in verdict["detail"] else [
               "no MemoryError"])),
]  # fmt: skip


# Not contained, by design (docs/sandbox.md): the program runs in the harness's interpreter, so it can read the
# nonce from the prelude's frame and report a pass itself, and the tests' own `==` trusts the objects it returns.
RESIDUAL: list[Attack] = [
    Attack("forge: read the nonce from the prelude's frame", "walk up the frames to the prelude's locals, write "
           "the nonce to the report pipe, exit 0 (wrong body)",
           "import sys, posix\nf = sys._getframe()\nwhile 'nonce' not in f.f_locals:\n    f = f.f_back\n"
           "posix.write(f.f_locals['report'], f.f_locals['nonce'])\nposix._exit(0)\n", verdicts=("passed",),
           wrong=True),
    Attack("forge: an object equal to everything", "return an object whose __eq__ is always true",
           "class Anything:\n    def __eq__(self, other):\n        return True\n"
           "def add(a, b):\n    return Anything()\n", verdicts=("passed",)),
]  # fmt: skip


def _program(attack: Attack, arena: Arena) -> str:
    body = arena.header() + attack.body
    if not attack.entry_point:
        return body
    return (WRONG_ADD if attack.wrong else RIGHT_ADD) + body + CHECK


@dataclass
class Row:
    attack: Attack
    verdict: dict
    survived: bool
    left: int
    breaches: list[str]

    @property
    def contained(self) -> bool:
        return not self.breaches and self.survived and self.left == 0 and self.verdict["status"] in self.attack.verdicts


@contextmanager
def _arena(root: Path) -> Iterator[Arena]:
    arena = Arena(root)
    try:
        yield arena
    finally:
        arena.close()


def run_attack(attack: Attack, root: Path, mode: str = "bwrap") -> Row:
    """Run one attack through a fresh evaluator process; what the test observes afterwards."""
    with _arena(root) as arena:
        job = {"program": _program(attack, arena), "timeout_s": attack.timeout_s, "memory_mb": attack.memory_mb,
               "sandbox": mode, "entry_point": "add" if attack.entry_point else None}  # fmt: skip
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(arena.home), ENV_SECRET: arena.secret}
        proc = subprocess.run(
            [sys.executable, "-I", "-c", EVALUATOR, str(SANDBOX_PY)],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=attack.timeout_s + 60,
        )
        left = pids_named(arena.marker)
        for pid in left:  # this attack's own leftovers (its marker), so that a failure does not linger
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lines = proc.stdout.strip().splitlines()
        survived = proc.returncode == 0 and bool(lines)
        died = {"status": f"evaluator died ({proc.returncode})", "passed": None, "detail": proc.stderr[-500:]}
        verdict = json.loads(lines[-1]) if survived else {**died, "peak_kib": 0}
        breaches = attack.breach(arena, verdict) + _listeners(arena, verdict)
        if attack.wrong and verdict.get("passed"):
            breaches.append("a wrong body scored as passed")
        return Row(attack, verdict, survived, len(left), breaches)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_hostile_program_is_contained(attack: Attack, tmp_path: Path) -> None:
    runner = os.getpid()
    row = run_attack(attack, tmp_path)
    assert row.survived, row.verdict
    assert row.verdict["status"] in attack.verdicts, row.verdict
    assert row.breaches == []
    assert row.left == 0
    os.kill(runner, 0)  # the test runner itself is alive (it would not be here otherwise; stated for the table)


@pytest.mark.parametrize("attack", RESIDUAL, ids=[a.name for a in RESIDUAL])
def test_documented_residual_forgeries_still_pass(attack: Attack, tmp_path: Path) -> None:
    """The limit docs/sandbox.md states: in-process forgery scores a pass. Should this start failing, the sandbox
    got stronger than documented: update the docs and move the attack to ATTACKS."""
    row = run_attack(attack, tmp_path)
    assert row.survived and row.verdict["status"] == "passed" and row.left == 0, row.verdict


def test_there_are_at_least_twenty_attacks() -> None:
    assert len(ATTACKS) >= 20 and len({a.name for a in ATTACKS}) == len(ATTACKS)


def _table(modes: list[str]) -> str:
    """The markdown table: one row per attack, for each mode its containment, verdict and processes left."""
    head = ["#", "attack", "what it tries"]
    for mode in modes:
        head += [f"{mode}: contained", f"{mode}: verdict", f"{mode}: evaluator survived", f"{mode}: processes left"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, attack in enumerate(ATTACKS + RESIDUAL, 1):
        cells = [str(i), attack.name, attack.what]
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="ralora_hostile_") as root:
                start = time.monotonic()
                row = run_attack(attack, Path(root), mode)
                took = time.monotonic() - start
            contained = "yes" if row.contained else "NO: " + "; ".join(row.breaches or [f"left {row.left}"])
            if attack in RESIDUAL:
                contained = "NO (residual, documented)" if row.verdict["status"] == "passed" else "yes"
            cells += [contained, f"{row.verdict['status']} ({took:.1f} s)", "yes" if row.survived else "NO",
                      str(row.left)]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if BWRAP_PROBLEM is not None:
        sys.exit(f"bwrap unusable here: {BWRAP_PROBLEM}")
    print(_table(["bwrap", "guard"] if "--guard" in sys.argv else ["bwrap"]))
