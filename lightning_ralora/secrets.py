"""Keep credentials out of what a run writes (results.json, the W&B config, checkpoints' hyperparameters):
`redact` blanks secret-looking config keys and every occurrence of a secret environment variable's value."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
# environment variables holding credentials: the well-known ones and any *_TOKEN/_KEY/_SECRET/_PASSWORD
SECRET_ENV = re.compile(
    r"(?i)^(WANDB_API_KEY|HF_TOKEN|HUGGING_FACE_HUB_TOKEN|OPENAI_API_KEY|.*_(TOKEN|KEY|SECRET|PASSWORD))$"
)
# config keys whose value is a credential (not `prompt_key`, `max_new_tokens` or a tokenizer's `pad_token`)
SECRET_KEY = re.compile(r"(?i)(^|[_-])(api_?key|secret|secret_key|password|passwd|auth_token|access_token|token)$")
SPECIAL_TOKEN = re.compile(r"(?i)^(pad|bos|eos|unk|sep|cls|mask|start|end|decoder_start)_token$")
MIN_SECRET_LEN = 8  # shorter values ("0", "true") are not matched by value: they would blank ordinary settings


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret-looking environment variables, longest first (so overlaps redact whole)."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if SECRET_ENV.match(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def is_secret_key(key: Any) -> bool:
    """A config key whose value is a credential (`api_key`, `hf_token`, `password`, ...)."""
    return isinstance(key, str) and bool(SECRET_KEY.search(key)) and not SPECIAL_TOKEN.match(key)


def redact(obj: Any, env: Mapping[str, str] | None = None) -> Any:
    """A copy of `obj` (plain dicts/lists/strings, e.g. `OmegaConf.to_container(cfg, resolve=True)`) with the values
    of secret-looking keys and every occurrence of a secret environment variable's value replaced by "<redacted>"."""
    values = secret_values(env)

    def walk(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else walk(v)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        if isinstance(x, str):
            for value in values:
                x = x.replace(value, REDACTED)
        return x

    return walk(obj)
