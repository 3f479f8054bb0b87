"""Keep credentials out of what a run writes (results.json, W&B's config, tags and metadata, checkpoints, Hydra's
`.hydra/*.yaml` and `multirun.yaml`).

A secret is (1) the value of a secret-looking config key (`api_key`, `hf_token`, `password`, ...), set in a config
or on the command line (`+model.hf_token=...`), or (2) the value of a secret environment variable (`HF_TOKEN`,
`WANDB_API_KEY`, any `*_TOKEN`/`*_KEY`/`*_SECRET`/`*_PASSWORD`), however it got into the config (`${oc.env:...}`,
the shell). `redact` blanks the first by key and every occurrence of either by value."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_ralora.core.io import atomic_write

REDACTED = "<redacted>"
# environment variables holding credentials: the well-known ones and any *_TOKEN/_KEY/_SECRET/_PASSWORD
SECRET_ENV = re.compile(
    r"(?i)^(WANDB_API_KEY|HF_TOKEN|HUGGING_FACE_HUB_TOKEN|OPENAI_API_KEY|.*_(TOKEN|KEY|SECRET|PASSWORD))$"
)
# config keys whose value is a credential (not `prompt_key`, `max_new_tokens` or a tokenizer's `pad_token`)
SECRET_KEY = re.compile(r"(?i)(^|[_-])(api_?key|secret|secret_key|password|passwd|auth_token|access_token|token)$")
SPECIAL_TOKEN = re.compile(r"(?i)^(pad|bos|eos|unk|sep|cls|mask|start|end|decoder_start)_token$")
# a Hydra override as the command line gives it: `[+|++|~]dotted.key[@package]=value`
OVERRIDE = re.compile(r"^(?P<key>[+~]{0,2}[A-Za-z_][\w.\-/@]*)=(?P<value>.*)$", re.DOTALL)
MIN_SECRET_LEN = 8  # shorter values ("0", "true") are not matched by value: they would blank ordinary settings
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes to <run_dir>/<output_subdir>


def is_secret_key(key: Any) -> bool:
    """A config key whose value is a credential (`api_key`, `hf_token`, `password`, ...; of a dotted key, the last
    part: `model.hf_token` is, `task.pad_token` is not)."""
    name = key.rsplit(".", 1)[-1] if isinstance(key, str) else None
    return name is not None and bool(SECRET_KEY.search(name)) and not SPECIAL_TOKEN.match(name)


def is_secret_path(dotted: str) -> bool:
    """A dotted key (`model.hf_token`, `+eval.judge.api_key@pkg`) with a secret-looking part: its value is secret."""
    return any(is_secret_key(part) for part in dotted.lstrip("+~").split("@", 1)[0].split("."))


def override_secret(override: Any) -> str | None:
    """The value an override (`+model.hf_token=hf_...`) gives a secret-looking key; None for any other string."""
    match = OVERRIDE.match(override) if isinstance(override, str) else None
    return match["value"] if match and is_secret_path(match["key"]) else None


def literal_secrets(obj: Any) -> Iterator[str]:
    """The values of secret-looking keys in a plain container and of the override strings in it that set one."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if is_secret_key(key):
                yield from (str(v) for v in _leaves(value))
            else:
                yield from literal_secrets(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from literal_secrets(value)
    elif (value := override_secret(obj)) is not None:
        yield value


def _leaves(obj: Any) -> Iterator[Any]:
    """Every non-null scalar of a plain container (what a secret key holds may be a nested block)."""
    if isinstance(obj, Mapping):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _leaves(value)
    elif obj is not None:
        yield obj


def secret_values(
    env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None, extra: Iterable[Any] = ()
) -> list[str]:
    """Every secret to blank wherever it appears, longest first (so overlaps redact whole): the values of the
    secret environment variables, of the command line's (`argv`, default `sys.argv`) overrides of secret-looking
    keys, and `extra` (e.g. a config's secret-key values); values shorter than MIN_SECRET_LEN are left out."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if SECRET_ENV.match(k)}
    values |= set(literal_secrets(list(sys.argv[1:] if argv is None else argv))) | {str(v) for v in extra}
    return sorted((v for v in values if len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def scrub(text: str, values: Sequence[str]) -> str:
    """`text` with every occurrence of the given secret values replaced by "<redacted>"."""
    for value in values:
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any, env: Mapping[str, str] | None = None, extra: Iterable[Any] = ()) -> Any:
    """A copy of `obj` (plain dicts/lists/strings, e.g. `OmegaConf.to_container(cfg, resolve=True)`) with the values
    of secret-looking keys and of overrides setting one (`+model.hf_token=<redacted>`) replaced by "<redacted>", and
    every occurrence of a secret (`secret_values`: the environment's, the command line's, those of `obj`'s own
    secret keys, `extra`) too."""
    values = secret_values(env, extra=[*literal_secrets(obj), *extra])

    def walk(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else walk(v)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        if isinstance(x, str):
            match = OVERRIDE.match(x)
            if match and is_secret_path(match["key"]):
                return f"{match['key']}={REDACTED}"
            return scrub(x, values)
        return x

    return walk(obj)


def config_secrets(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """The secret values a config holds: its secret-looking keys' values (resolved where they resolve, so
    `${oc.env:...}` gives the value) and those of the overrides it lists."""
    if not isinstance(cfg, DictConfig):
        return list(literal_secrets(cfg))
    plain: dict[Any, Any] = {}
    for key in cfg:  # section by section: one that does not resolve (e.g. outside Hydra's runtime) is taken as written
        try:
            value = cfg[key]
            plain[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:
            plain[key] = OmegaConf.to_container(cfg, resolve=False)[key]
    return list(literal_secrets(plain))


@contextmanager
def redacted_argv(extra: Iterable[Any] = ()) -> Iterator[list[str]]:
    """`sys.argv` redacted inside the block (W&B records it as its metadata `args` at `wandb.init`), restored after:
    a DDP launcher that re-runs the command line later must get the real one."""
    original = sys.argv
    sys.argv = [original[0], *redact(list(original[1:]), extra=extra)] if original else []
    try:
        yield sys.argv
    finally:
        sys.argv = original


def wandb_init_with_redacted_argv() -> None:
    """Make `wandb.init` run with `sys.argv` redacted (`redacted_argv`): W&B stores the command line as its metadata
    `args`, and Lightning's WandbLogger calls `wandb.init` lazily, inside `fit`. Wraps it once per process."""
    import wandb

    init = wandb.init
    if getattr(init, "redacts_argv", False):
        return

    @functools.wraps(init)
    def redacting_init(*args: Any, **kwargs: Any) -> Any:
        with redacted_argv():
            return init(*args, **kwargs)

    redacting_init.redacts_argv = True  # type: ignore[attr-defined]
    wandb.init = redacting_init


def redact_yaml_file(path: str | Path, extra: Iterable[Any] = ()) -> bool:
    """Rewrite a YAML file Hydra wrote (`.hydra/config.yaml`, `multirun.yaml`, ...) with `redact` applied,
    atomically; untouched when it holds no secret. True when it was rewritten."""
    path = Path(path)
    if not path.is_file():
        return False
    plain = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    clean = redact(plain, extra=extra)
    if clean == plain:
        return False
    text = OmegaConf.to_yaml(OmegaConf.create(clean))
    atomic_write(path, lambda f: f.write(text.encode()))
    return True
