"""Command-line checks that run before Hydra does: an override Hydra cannot parse, an unknown config-group option, a
key that is not in the config, a value of the wrong type for one of Hydra's typed keys, a sweep without `-m`, and a
run or sweep directory that cannot be created each become one line on stderr and exit code 2, before anything is
written or loaded (Hydra itself prints several lines or a traceback and exits 1, after creating the run dir for some).

The config is composed with Hydra's own parser and config loader, exactly as `lightning-ralora-train` composes it
(the package's conf/, `--config-dir`, `--config-name`, `--config-path`, `hydra.searchpath=[...]`); a multirun checks
every value of each swept override with the other overrides at their first value, not the whole product.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from lightning_ralora.run.compose import CONF_DIR

PROG = "lightning-ralora-train"
GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def check_command_line(argv: Sequence[str], prog: str = PROG) -> list[str]:
    """The problems of a `lightning-ralora-train` command line (`argv` without the program), one line each, every
    line starting with `<prog>: `; empty when Hydra will compose every job and can create its directory, or when
    the command asks for Hydra's own output (--help, --hydra-help, --version, --cfg, --info, --shell-completion)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    args, problem = _parse_args(argv)
    if problem:
        return [f"{prog}: {problem}"]
    if args is None or _shows_hydra_output(args):
        return []
    if args.config_dir is not None and not os.path.isdir(os.path.abspath(args.config_dir)):
        return [f"{prog}: --config-dir {args.config_dir}: not a directory (it adds a config directory to the search)"]
    hydra, hydra_cfg = GlobalHydra.instance().hydra, HydraConfig.instance().cfg
    try:
        with warnings.catch_warnings():  # Hydra repeats its warnings when it runs
            warnings.simplefilter("ignore")
            composer = _Composer.create(args)
            problems = composer.check(list(args.overrides), bool(args.multirun))
    finally:  # Hydra's singletons as they were: hydra.main initializes its own
        GlobalHydra.instance().hydra, HydraConfig.instance().cfg = hydra, hydra_cfg
    return [f"{prog}: {p}" for p in dict.fromkeys(problems)]


def exit_on_bad_command_line(argv: Sequence[str], prog: str = PROG) -> None:
    """Print each problem of the command line on stderr and exit 2; return when there is none."""
    problems = check_command_line(argv, prog)
    if problems:
        print("\n".join(problems), file=sys.stderr, flush=True)
        sys.exit(2)


def _parse_args(argv: Sequence[str]) -> tuple[Any, str | None]:
    """Hydra's own argument parser on `argv`: (namespace, None), (None, None) when argparse already answered
    (--version), or (None, its error)."""
    from hydra._internal.utils import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            return get_args_parser().parse_args(list(argv)), None
    except SystemExit as done:
        if not done.code:
            return None, None
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return None, (lines[-1].split("error: ", 1)[-1] if lines else "invalid command line") + " (see --hydra-help)"


def _shows_hydra_output(args: Any) -> bool:
    """True when Hydra answers the command itself instead of running a job (help, config, info, completion)."""
    return bool(
        args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.experimental_rerun
    )


@dataclass
class _Composer:
    """Hydra's config loader for this command line's search path and primary config."""

    hydra: Any
    config_name: str | None
    config_path: str | None = None

    @classmethod
    def create(cls, args: Any) -> _Composer:
        """The Hydra instance `hydra.main` in cli/train.py would create for these arguments."""
        from hydra._internal.hydra import Hydra
        from hydra._internal.utils import create_automatic_config_search_path

        train_py = str(Path(__file__).with_name("train.py"))  # the file whose hydra.main this mirrors
        search_path = create_automatic_config_search_path(train_py, None, args.config_path or CONF_DIR)
        if args.config_dir is not None:
            from hydra.core.config_search_path import SearchPathQuery

            directory = os.path.abspath(args.config_dir)
            search_path.prepend("command-line", f"file://{directory}", anchor=SearchPathQuery(provider="schema"))
        hydra = Hydra.create_main_hydra2(task_name="train", config_search_path=search_path)
        return cls(hydra, args.config_name or "config", args.config_path)

    def compose(self, overrides: Sequence[str], multirun: bool = False, validate: bool = True) -> DictConfig:
        """The composed config (Hydra node included) of one job; raises Hydra's exceptions."""
        from hydra.types import RunMode

        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        loader = self.hydra.config_loader
        return loader.load_configuration(self.config_name, list(overrides), mode, validate_sweep_overrides=validate)

    def check(self, overrides: list[str], multirun: bool) -> list[str]:
        """Every problem of the command line: parse errors first; else composition errors of each job and the
        directory Hydra would create."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra.config_loader)
        parsed, problems = [], []
        for text in overrides:
            try:
                parsed += parser.parse_overrides([text])  # sets the config loader a glob() sweep lists options with
            except Exception as err:
                problems.append(
                    f"{text}: cannot parse this override: {_parse_error(text, err)} (grammar: {GRAMMAR_URL})"
                )
                continue
            if not parsed[-1].key_or_group:
                problems.append(f"{text}: cannot parse this override: no key before '=' (write key=value)")
        problems += _searchpath_problems(parsed)
        if problems:
            return problems
        sweeps = [o for o in parsed if o.is_sweep_override()]
        if not multirun and sweeps:
            multirun = self._mode_is_multirun(overrides)
        if sweeps:
            problem = _sweep_problem(parsed, multirun)
            if problem:
                return [problem]
            problems = [p for p in (_sweep_value_problem(o, o.input_line) for o in sweeps) if p]
            if problems:
                return problems
        directory_checked = False
        for job in _jobs(parsed) if multirun else [overrides]:
            try:
                cfg = self.compose(job)
            except Exception as err:
                problems.append(self.explain(err, job))
                continue
            if not directory_checked:  # Hydra resolves the sweep dir once, in the sweep's own config
                directory_checked = True
                sweep = multirun or str(OmegaConf.select(cfg, "hydra.mode", default="")).endswith("MULTIRUN")
                problems += filter(None, [_directory_problem(cfg, sweep)])
                problems += _search_space_problems(cfg, parser)
        return problems

    def _mode_is_multirun(self, overrides: Sequence[str]) -> bool:
        """Hydra's own `get_mode`: the composed `hydra.mode` (an `hparams_search` config makes a multirun)."""
        try:
            cfg = self.compose(overrides, multirun=True, validate=False)
        except Exception:
            return False
        return str(OmegaConf.select(cfg, "hydra.mode", default="")).endswith("MULTIRUN")

    def explain(self, err: Exception, job: Sequence[str]) -> str:
        """One line for a composition error of `job`, naming the override and what is allowed."""
        from hydra.errors import MissingConfigException

        message = str(err)
        if isinstance(err, MissingConfigException):
            return self._missing_config(err, job)
        cause = err.__cause__
        match = re.match(r"Could not override '([^']*)'", message)
        if match and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            return self._unknown_key(match.group(1), job, prefix="")
        if match := re.match(r"Could not append to config. An item is already at '([^']*)'", message):
            key = match.group(1)
            text = _override_for(job, key, "+")
            value = text.split("=", 1)[1] if "=" in text else "..."
            return f"{text}: '{key}' is already in the config: set it with {key}={value} (or ++{key}={value})"
        if match := re.match(r"Could not delete from config. '([^']*)' does not exist", message):
            return self._unknown_key(match.group(1), job, prefix="~")
        if match := re.match(r"Error merging override (.*)", message):
            return f"{match.group(1)}: {_first_line(cause) if cause else 'cannot be merged into the config'}"
        named = next((o for o in job if o in message or f"'{_key_of(o)}'" in message), None)
        return f"{named}: {_one_line(err)}" if named else _one_line(err)

    def _missing_config(self, err: Any, job: Sequence[str]) -> str:
        """An unknown option of a config group (with the options that exist), or an unknown primary config."""
        missing = str(err.missing_cfg_file or "")
        if err.options is None or "/" not in missing:
            if self.config_path is not None and not missing:
                return f"--config-path {self.config_path}: {_first_line(err)}"
            from hydra.core.object_type import ObjectType

            names = [n for n in self.hydra.config_loader.get_group_options("", ObjectType.CONFIG) if n[0] != "_"]
            return f"--config-name {missing}: no such primary config; the search path has: {', '.join(names)}"
        group, option = missing.rsplit("/", 1)
        options = sorted(err.options)
        if not options:
            return f"{_override_for(job, group, '') or missing}: there is no config group '{group}' ({group}/*.yaml)"
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        where = _override_for(job, group, "")
        if not where:  # named by a config's defaults list, not by the command line
            parent = re.match(r"In '([^']*)'", str(err))
            where = f"{group}={option} (in {parent.group(1) if parent else 'the defaults list'})"
        return f"{where}: '{option}' is not an option of config group '{group}'{hint}; options: {', '.join(options)}"

    def _unknown_key(self, key: str, job: Sequence[str], prefix: str) -> str:
        """A key that is not in the config: the `+key=value` advice and the closest existing keys."""
        text = _override_for(job, key, prefix) or f"{prefix}{key}"
        try:
            tree = OmegaConf.to_container(self.compose([o for o in job if o != text]), resolve=False)
        except Exception:
            tree = {}
        close = _close_keys(tree, key)
        value = text.split("=", 1)[1] if "=" in text else "..."
        if key in close and key.startswith("hydra.sweeper.params."):  # the params' keys hold dots: no override path
            param = key[len("hydra.sweeper.params.") :]
            return (
                f"{text}: a search-space key holds dots, so it cannot be set as hydra.sweeper.params.<key> on the "
                f"command line; give the sweep itself: {param}={value.strip(chr(39) + chr(34))}"
            )
        near = f"closest existing keys: {', '.join(close)}" if close else "no existing key is close"
        if prefix == "~":
            return f"{text}: '{key}' is not in the config, nothing to delete ({near})"
        return f"{text}: '{key}' is not in the config ({near}); to add a new key use +{key}={value}"


def _first_line(err: BaseException | None) -> str:
    """The first non-empty line of an exception's message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _parse_error(text: str, err: BaseException) -> str:
    """What Hydra's override parser says is wrong, in one line (its own message spans two or three)."""
    prefix = "LexerNoViableAltException: "
    raw = str(err).splitlines()
    if len(raw) > 1 and raw[0].startswith(prefix) and raw[1].strip() == "^":  # the caret marks the bad character
        start = len(raw[1]) - 1 - len(prefix)
        return f"unexpected {text[start:]!r} at position {start}"
    lines = [line.strip() for line in raw]
    detail = [line for line in lines if line and not line.startswith(("Error parsing override", "See https"))]
    return " ".join(detail) or _first_line(err)


def _one_line(err: BaseException) -> str:
    """A multi-line Hydra message as one line (without its search-path listing and links)."""
    lines = []
    for line in str(err).splitlines():
        if line.startswith(("Config search path", "Search path", "See https")):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(err).__name__


def _key_of(text: str) -> str:
    """The key or group of an override as written (`+adapter.r=4` -> adapter.r, `adapter@x=lora` -> adapter)."""
    return text.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _override_for(job: Sequence[str], key: str, prefix: str) -> str:
    """The override of `job` that sets `key` (with `prefix`, + or ~, when given); '' if none does."""
    for text in job:
        if _key_of(text) == key and (not prefix or text.startswith(prefix)):
            return text
    return ""


def _searchpath_problems(parsed: Sequence[Any]) -> list[str]:
    """`hydra.searchpath=[...]` entries that are not directories (Hydra only warns, then misses their configs)."""
    problems = []
    for override in parsed:
        if override.get_key_element().lstrip("+") != "hydra.searchpath" or override.is_sweep_override():
            continue
        entries = override.value()
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            problems.append(f"{override.input_line}: hydra.searchpath must be a list of paths, e.g. [file:///my/conf]")
            continue
        for entry in entries:
            if entry.startswith("pkg://"):
                continue
            path = entry[len("file://") :] if entry.startswith("file://") else entry
            if not os.path.isdir(path):
                problems.append(
                    f"{override.input_line}: {path} is not a directory (entries: file:///abs/dir or pkg://)"
                )
    return problems


def _sweep_problem(parsed: Sequence[Any], multirun: bool) -> str | None:
    """A sweep in a single run (needs -m), or a sweep over Hydra's own settings, in Hydra's words made one line."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.types import RunMode

    mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    try:
        ConfigLoaderImpl.validate_sweep_overrides_legal(list(parsed), mode, from_shell=True)
    except Exception as err:
        bad = next((o for o in parsed if f"'{o.input_line}'" in str(err)), None)
        text = bad.input_line if bad is not None else _first_line(err)
        if multirun:
            return f"{text}: Hydra's own settings (hydra.*) cannot be swept"
        key = bad.get_key_element() if bad is not None else "key"
        return (
            f"{text}: a sweep needs -m (--multirun), one job per value; for a list write {key}=[a,b], "
            f"for a string with commas quote it"
        )
    return None


def _search_space_problems(cfg: DictConfig, parser: Any) -> list[str]:
    """The Optuna sweeper's `params` (an `hparams_search` config) as `_sweep_value_problem` checks a command line's
    sweeps, named by their config key."""
    sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None)
    if sweeper is None or "optuna" not in str(OmegaConf.select(sweeper, "_target_", default="")).lower():
        return []
    problems = []
    for key, text in (OmegaConf.select(sweeper, "params", default=None) or {}).items():
        where = f"hydra.sweeper.params.{key}={text}"
        try:
            problems.append(_sweep_value_problem(parser.parse_overrides([f"{key}={text}"])[0], where))
        except Exception as err:  # noqa: BLE001 - reported as one line
            problems.append(f"{where}: cannot parse this search space: {_first_line(err)}")
    return [p for p in problems if p]


def _sweep_value_problem(override: Any, where: str) -> str | None:
    """A sweep with no value to run or sample, which Hydra or Optuna would meet with a traceback once the sweep has
    started: a range that is empty or steps by 0, an interval whose low end is above its high end, a log interval
    reaching 0 or below."""
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep) and value.start > value.end:
        return f"{where}: interval(low, high) needs low <= high, got {value.start} > {value.end}"
    if isinstance(value, IntervalSweep) and "log" in value.tags and value.start <= 0:
        return f"{where}: a log interval needs 0 < low, got low={value.start}"
    if override.is_discrete_sweep():
        try:
            if next(iter(override.sweep_string_iterator()), None) is None:
                return f"{where}: this sweep holds no value"
        except ValueError as err:  # range(a, b, 0)
            return f"{where}: {err}"
    return None


def _values(override: Any) -> list[str]:
    """Each job's form of one override: its sweep values (an interval at its start), or itself."""
    if not override.is_sweep_override():
        return [override.input_line]
    key = override.get_key_element()
    if override.is_discrete_sweep():
        return [f"{key}={value}" for value in override.sweep_string_iterator()]
    start = getattr(override.value(), "start", None)
    return [f"{key}={start}"] if start is not None else []


def _jobs(parsed: Sequence[Any]) -> list[list[str]]:
    """The jobs to check in a multirun: every override at its first value, then each further value of each swept
    override with the others at their first value."""
    values = [v for v in (_values(o) for o in parsed) if v]
    first = [v[0] for v in values]
    jobs = {tuple(first): None}
    for i, options in enumerate(values):
        for value in options[1:]:
            jobs[tuple(first[:i] + [value] + first[i + 1 :])] = None
    return [list(job) for job in jobs]


def _flatten(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a plain container, sections included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}"
            yield from _flatten(value, f"{prefix}{key}.")


def _close_keys(tree: Any, key: str) -> list[str]:
    """Existing keys close to `key`: the first missing part matched against its siblings (difflib), else keys
    anywhere whose last part is close to the key's last part (`lr` -> optim.lr)."""
    keys = [k for k in _flatten(tree) if key.startswith("hydra.") or not k.startswith("hydra")]
    known = set(keys)
    parts = key.split(".")
    node, depth = tree, 0
    while depth < len(parts) - 1 and isinstance(node, dict) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    hits: list[str] = []
    if isinstance(node, dict):
        names = difflib.get_close_matches(parts[depth], [str(k) for k in node], n=3)
        hits = [".".join([*parts[:depth], name, *parts[depth + 1 :]]) for name in names]
        hits = [h for h in hits if h in known]
    if not hits:
        leaf = parts[-1]
        hits = [k for k in keys if difflib.SequenceMatcher(None, k.rsplit(".", 1)[-1], leaf).ratio() >= 0.8][:3]
    return hits


def _split_path(raw: str) -> list[str]:
    """A path with interpolations split on the slashes outside `${...}`."""
    parts, depth, current = [], 0, ""
    for char in raw:
        depth += char == "{"
        depth -= char == "}"
        if char == "/" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def _resolve_as(cfg: DictConfig, key: str, value: str) -> str | None:
    """`value` resolved as the value of `key` in `cfg`; None when it does not resolve before the run (a runtime-only
    Hydra value such as `${hydra:job.num}` is missing, or None)."""
    OmegaConf.update(cfg, key, value, merge=False)
    try:
        resolved = str(OmegaConf.select(cfg, key, throw_on_resolution_failure=True))
    except Exception:
        return None
    return None if "${hydra:" in value and "None" in resolved else resolved


def _resolve_prefix(cfg: DictConfig, node: str, raw: str) -> tuple[str, bool]:
    """(the path `raw` resolves to in `cfg`, True) or, when it does not resolve outside a run, (its longest leading
    run of directories that does, False)."""
    parts = _split_path(raw)
    resolved = ""
    with read_write(cfg.hydra):
        full = _resolve_as(cfg, f"{node}.dir", raw)
        if full is not None:
            return full, True
        for n in range(1, len(parts)):
            prefix = _resolve_as(cfg, f"{node}.dir", "/".join(parts[:n]))
            if prefix is None:
                break
            resolved = prefix
    return resolved, False


def _directory_problem(cfg: DictConfig, multirun: bool) -> str | None:
    """The run dir (sweep dir in a multirun) cannot be created: its nearest existing ancestor is a file, or is not
    a writable directory."""
    from hydra.core.hydra_config import HydraConfig

    node = "hydra.sweep" if multirun else "hydra.run"
    raw = OmegaConf.to_container(OmegaConf.select(cfg, node), resolve=False)
    path = str(raw["dir"]) + (f"/{raw['subdir']}" if multirun and raw.get("subdir") else "")
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` resolves as in the run
    resolved, complete = _resolve_prefix(cfg, node, path)
    target = Path(os.path.abspath(resolved or "."))
    blocking = next((p for p in (target, *target.parents) if os.path.lexists(p)), None)
    if blocking is None:
        return None
    if blocking.is_dir() and os.access(blocking, os.W_OK | os.X_OK):
        return None
    why = "is not a writable directory" if blocking.is_dir() else "is a file, not a directory"
    shown = target if complete else f"{target}/..."
    return (
        f"{node}.dir: cannot create {shown}: {blocking} {why} "
        f"(set {node}.dir or paths.root_dir to a writable directory)"
    )
