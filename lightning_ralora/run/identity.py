"""Run identity: what makes two runs the same experiment, so they share nothing unless their results would match.

A run's identity is its composed config after the experiment's `methods:` entry is applied, without the keys that
do not change the result (where it runs and logs: `NON_IDENTITY`; credentials: any secret-looking key, secrets.py,
so no identity, checkpoint or W&B tag holds one) and without the seed (runs of one identity are the seeds of one
table cell). Its short hash names the run directory (`<experiment>/<variant>-<model>-<task>-<hash>/seed<N>`), the
W&B group and name, and with the seed the W&B id, so the same config always lands in the same place (a requeued job
finds its checkpoint) and any change moves it. A checkpoint stores the identity; resuming it under a different one is
refused, naming the keys that differ, unless `resume.allow_changes` lists them (e.g. a longer `trainer.max_steps`: a
new identity, so a new run directory and W&B run, started from the old run's checkpoint given as `ckpt_path=<path>`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.core.secrets import is_secret_path, literal_secrets, override_secret, redact
from lightning_ralora.modules.adapter_module import checkpoint_metadata_file
from lightning_ralora.run.methods import apply_method_settings, command_line

IDENTITY_KEY = "run_identity"  # the checkpoint's entry: {"hash": ..., "keys": {dotted key: value}}

# dotted prefixes that do not change what a run computes: placement, logging, paths, resume plumbing
NON_IDENTITY: tuple[str, ...] = (
    "seed",
    "run_dir",
    "overrides",
    "ckpt_path",
    "fresh",
    "resume",
    "hydra",
    "wandb",
    "logger",
    "paths",
    "export",
    "not_reproduced",
    "methods",  # applied first: its effect is in the adapter/optim keys, other methods' rows do not matter
    "adapter.compile",  # the same maths, compiled
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "callbacks.checkpoint",
    "callbacks.lr_monitor",
    "callbacks.alignment",
    "callbacks.divergence",
    "callbacks.gid_over_training",
    "eval.judge",
    "eval.base_url",  # the serving keys: only lightning-ralora-eval reads them (training refuses eval.backend=openai)
    "eval.model",
    "eval.api_key_env",
    "eval.concurrency",
    "eval.request_timeout",
    "eval.max_retries",
    "eval.backoff",
    "eval.engine",
    "eval.batch_size",
    "eval.allow_code_execution",
    "eval.sandbox",
    "eval.num_workers",
)


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of a nested plain container; lists are leaves."""
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _excluded(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def identity_keys(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of everything that defines the run's result (unresolved interpolations stay as text, so
    nothing is resolved that depends on the run directory); secret-looking keys left out, secret values redacted."""
    root = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    plain = OmegaConf.to_container(root, resolve=False)
    try:  # the methods entry of the adapter; a config error here is reported by the run itself, in its directory
        body = OmegaConf.create({k: v for k, v in plain.items() if k != "hydra"})
        plain = OmegaConf.to_container(apply_method_settings(body, command_line(root)), resolve=False)
    except Exception:
        pass
    keys = {k: v for k, v in sorted(_flatten(plain)) if k and not _excluded(k, NON_IDENTITY) and not is_secret_path(k)}
    return redact(keys, extra=literal_secrets([plain, command_line(root)]))  # a secret elsewhere: "<redacted>"


def identity_hash(keys: Mapping[str, Any]) -> str:
    """8 hex digits of the SHA-256 of the identity keys (canonical JSON)."""
    text = json.dumps(dict(keys), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_label(cfg: DictConfig | Mapping[str, Any], digest: str | None = None) -> str:
    """`<variant>-<model>-<task>-<hash>`: the readable part of a run's directory, W&B group and name (`digest`:
    the identity hash, when the caller has it)."""
    root = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    names = [OmegaConf.select(root, f"{g}.name", default="?") for g in ("adapter", "model", "task")]
    return "-".join([*map(str, names), digest or identity_hash(identity_keys(root))])


def identity_overrides(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """The command-line overrides that are part of the identity (readable W&B tags / config), seed and secret keys
    excluded, any secret value in the rest redacted."""
    root = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    given = command_line(root)
    keep = [o for o in given if not _excluded(o.split("=", 1)[0].lstrip("+~"), NON_IDENTITY)]
    return redact([o for o in keep if override_secret(o) is None], extra=literal_secrets(given))


def run_label_resolver(*, _root_: DictConfig) -> str:
    """OmegaConf resolver `${run_identity:}` (conf/hydra/default.yaml): the run label of the config being composed."""
    return run_label(_root_)


def wandb_id(label: str, seed: Any) -> str:
    """A stable W&B run id for (identity, seed): a resumed or requeued run continues the same W&B run."""
    return hashlib.sha256(f"{label}/seed{seed}".encode()).hexdigest()[:16]


def checkpoint_identity(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The identity a Lightning checkpoint was written under (None for checkpoints from before identities)."""
    import torch

    ckpt = torch.load(checkpoint_metadata_file(ckpt_path), map_location="cpu", weights_only=True, mmap=True)
    return ckpt.get(IDENTITY_KEY) if isinstance(ckpt, Mapping) else None


def identity_changes(stored: Mapping[str, Any], current: Mapping[str, Any], allow: Sequence[str] = ()) -> list[str]:
    """`key: old -> new` for every identity key that differs between a checkpoint and this run (allowed keys and
    the keys below them skipped; so are secret-looking keys, which an older checkpoint may hold: never shown)."""
    changes = []
    for key in sorted(set(stored) | set(current)):
        if _excluded(key, list(allow)) or is_secret_path(key):
            continue
        old, new = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


def identity_record(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity: hash, label `<variant>-<model>-<task>-<hash>`, the identity overrides and
    keys; what results.json, the checkpoint and W&B carry."""
    keys = identity_keys(cfg)
    digest = identity_hash(keys)
    return {"hash": digest, "label": run_label(cfg, digest), "overrides": identity_overrides(cfg), "keys": keys}


def check_resume_identity(cfg: DictConfig, ckpt: str | None) -> dict[str, Any]:
    """The run identity; when resuming, a ConfigError naming each identity key that differs from the checkpoint's
    (unless listed in `resume.allow_changes`)."""
    identity = identity_record(cfg)
    if not ckpt:
        return identity
    stored = checkpoint_identity(ckpt)
    if stored is None:
        print(f"resume: {ckpt} carries no run identity (older checkpoint): not checked", file=sys.stderr)
        return identity
    allow = [str(k) for k in (OmegaConf.select(cfg, "resume.allow_changes", default=None) or [])]
    changes = identity_changes(stored.get("keys") or {}, identity["keys"], allow)
    if changes:
        raise ConfigError(
            [f"ckpt_path={ckpt} was trained under another config: {c} (keep the checkpoint's value, or allow the "
             f"change with resume.allow_changes=[{c.split(':', 1)[0]}])" for c in changes]
        )  # fmt: skip
    return identity
