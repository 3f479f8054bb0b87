"""Expected peak memory per GPU of a run, from its config alone: weights, adapters, optimizer state, gradients,
activations and the GID warm-up, at the configured sharding and dtypes (no weights loaded, works offline).

Parameters are counted on the meta-device skeleton (`modules.backbone.meta_backbone`, `adapter_sites`) with the
adapter attached as the training code attaches it (the variant's `Attachment`); a hub model that cannot be reached
uses the architecture table `ARCH` below. `lightning-ralora-plan-memory [overrides] [--json]` prints the plan and
writes `<run_dir>/plan_memory.json`. The formulas are in docs/fsdp.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_ralora.adapters.attach import attachment
from lightning_ralora.adapters.registry import adapter_config
from lightning_ralora.core.errors import ConfigError
from lightning_ralora.core.io import markdown_table, write_json_atomic
from lightning_ralora.modules.backbone import adapter_sites, block_module_names, load_config, meta_backbone
from lightning_ralora.rank.estimate import assign_owners
from lightning_ralora.run.methods import apply_method_settings
from lightning_ralora.run.validate import validate_config
from lightning_ralora.tasks import TASKS

GIB = 1024**3
_LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
_VIT = {"model_type": "vit", "image_size": 224, "patch_size": 16}
# architecture dims of the shipped hub models, used when their hub config cannot be read (offline)
ARCH: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA3_8B,
    "google/gemma-2b": {
        "model_type": "gemma",
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 256000,
        "tie_word_embeddings": True,
    },
    "google-t5/t5-base": {
        "model_type": "t5",
        "d_model": 768,
        "d_ff": 3072,
        "d_kv": 64,
        "num_layers": 12,
        "num_decoder_layers": 12,
        "num_heads": 12,
        "vocab_size": 32128,
        "tie_word_embeddings": True,
    },
    "FacebookAI/roberta-base": {
        "model_type": "roberta",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 50265,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "pad_token_id": 1,
    },
    "google/vit-base-patch16-224-in21k": {
        **_VIT,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "google/vit-large-patch16-224-in21k": {
        **_VIT,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
    "openai/clip-vit-base-patch16": {
        "model_type": "clip",
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "vocab_size": 49408},
        "projection_dim": 512,
    },
}
# elements saved for backward per token and block: C_H·hidden + C_I·intermediate (C_I = 4 gated MLP, 2 plain);
# C_H = 9 counts a Llama block with SDPA (norm inputs/outputs, q, k, v, attention output, o_proj input)
C_H, C_I_GATED, C_I_PLAIN = 9, 4, 2
LOGIT_COPIES = 3  # fp32 logits, their log-softmax and its gradient (the loss's vocabulary-sized tensors)
HALF = {"bf16": torch.bfloat16, "16": torch.float16}


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype(name: Any, field: str) -> torch.dtype:
    value = getattr(torch, str(name), None) if name not in (None, "auto") else torch.float32
    if not isinstance(value, torch.dtype):
        raise ConfigError([f"{field}={name!r} is not a torch dtype (e.g. float32, bfloat16)"])
    return value


# --------------------------------------------------------------------------------------------------------------
# counting on the meta skeleton
# --------------------------------------------------------------------------------------------------------------
def offline_model_cfg(model: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The model section with a buildable config: the hub/local config if readable, else the ARCH table's dims."""
    model = dict(model)
    if not model.get("pretrained"):
        return model, "model.config"
    try:
        load_config(model)
        return model, f"config of {model['pretrained']}"
    except Exception as err:  # noqa: BLE001 - offline or unknown: fall back to the table
        dims = ARCH.get(model["pretrained"])
        if dims is None:
            raise ConfigError(
                [
                    f"model.pretrained={model['pretrained']!r}: its config cannot be read "
                    f"({type(err).__name__}) and it is not in memory_plan.ARCH {sorted(ARCH)}; give a local "
                    "directory or model.config"
                ]
            ) from None
        return {**model, "pretrained": None, "config": dict(dims)}, f"memory_plan.ARCH[{model['pretrained']!r}]"


def count_params(model: Mapping[str, Any], task: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, Any]:
    """Parameter counts on the meta skeleton: total, targets, trainable in full (heads), adapter parameters, the
    largest block (an FSDP unit) and the architecture dims the activation formula needs."""
    skeleton = meta_backbone(model, task)
    heads = TASKS[task["name"]].head_modules if task.get("name") in TASKS else ()
    sites = adapter_sites(skeleton, model, adapter, heads)
    targets = list(sites.targets)
    total = sum(p.numel() for p in skeleton.parameters())
    target_sizes = {t: out * in_ for t, (out, in_) in sites.targets.items()}
    target_n = sum(target_sizes.values())
    full_params = {id(p): p for n in sites.full for p in skeleton.get_submodule(n).parameters()}  # each once
    head_n = sum(p.numel() for p in full_params.values())
    blocks = [m for m in skeleton.modules() if type(m).__name__ in block_module_names(skeleton)]
    block_n = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=total)
    kind = adapter.get("kind")
    adapter_n = 0 if kind is None else attachment(kind).adapter_params(skeleton, targets, adapter)
    return {
        "total": total,
        "targets": target_n,
        "target_modules": len(targets),
        "target_sizes": target_sizes,
        "full_modules": head_n,
        "adapter": adapter_n,
        "block": block_n,
        "blocks": len(blocks),
        "gated": any(n.endswith(("gate_proj", "wi_0")) for n, _ in skeleton.named_modules()),
        **_dims(skeleton.config),
    }


def _dims(config: Any) -> dict[str, int]:
    """hidden, intermediate, layers (encoder + decoder), vocab and image/patch size of a transformers config."""
    c = getattr(config, "vision_config", None) or config
    get = lambda *names: next((int(getattr(c, n)) for n in names if getattr(c, n, None) is not None), 0)  # noqa: E731
    return {
        "hidden": get("hidden_size", "d_model"),
        "intermediate": get("intermediate_size", "d_ff"),
        "layers": get("num_hidden_layers", "num_layers") + get("num_decoder_layers"),
        "vocab": get("vocab_size") if c is config else 0,
        "image_size": get("image_size"),
        "patch_size": get("patch_size"),
    }


# --------------------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------------------
def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError([f"{field}={value!r}: give a positive integer to plan memory per GPU"])
    return value


def sharding(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """How many ranks share weights/grads/optimizer state: FSDP2 over the data-parallel size (nodes x devices /
    tp), HSDP over `shard_size` (default: one node's devices); DDP and a single device replicate (1)."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices
    world = _int(devices, "trainer.devices") * _int(nodes, "trainer.num_nodes")
    strategy = trainer.get("strategy")
    s = dict(strategy) if isinstance(strategy, Mapping) else {}
    target = str(s.get("_target_", strategy))
    if not (target.endswith(("FSDP2Strategy", "ModelParallelStrategy")) or target == "fsdp"):
        return {"strategy": target, "world": world, "shard": 1, "sharded": False, **s}
    tp = _int(s.get("tensor_parallel_size", 1), "trainer.strategy.tensor_parallel_size")
    dp = world // tp
    shard = _int(s.get("shard_size") or devices, "trainer.strategy.shard_size") if s.get("hsdp") else dp
    if dp % shard:
        raise ConfigError([f"trainer.strategy.shard_size={shard} does not divide the data-parallel size {dp}"])
    return {"strategy": target.rsplit(".", 1)[-1], "world": world, "shard": shard, "sharded": shard > 1, **s}


def gid_warmup_bytes(n: Mapping[str, Any], world: int, dtype: torch.dtype, rank0_only: bool = False) -> int:
    """Weights and gradient memory of the GID warm-up on its busiest rank: the full model, the fp32 sums this rank
    owns (rank.estimate.assign_owners over `world`; all of them when one rank runs it, as with load_on_rank0),
    one block's gradient and one fp32 copy of the largest target's gradient (half-precision models)."""
    sizes = n["target_sizes"]
    owners = assign_owners(sizes, 1 if rank0_only else max(world, 1))
    sums = max(sum(v for t, v in sizes.items() if owners[t] == r) for r in set(owners.values())) if sizes else 0
    upcast = max(sizes.values(), default=0) * 4 if _bytes(dtype) < 4 else 0
    return n["total"] * _bytes(dtype) + sums * 4 + n["block"] * _bytes(dtype) + upcast


def tokens_per_step(task: Mapping[str, Any], dims: Mapping[str, int]) -> tuple[int, int]:
    """(batch, tokens per example) of one micro-batch: the task's batch_size and max_length / seq_len, or the
    patches + CLS of an image."""
    batch = _int(task.get("batch_size"), "task.batch_size")
    if task.get("name") == "image_classification":
        size = task.get("image_size") or dims["image_size"]
        return batch, (int(size) // max(dims["patch_size"], 1)) ** 2 + 1
    seq = task.get("seq_len") or task.get("max_length")
    return batch, _int(seq, "task.max_length" if "max_length" in task else "task.seq_len")


def estimate_memory(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The memory plan (bytes per GPU per component, the peak, the assumptions) of a composed run config."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    model, task, adapter, trainer = (dict(c.get(k) or {}) for k in ("model", "task", "adapter", "trainer"))
    model, source = offline_model_cfg(model)
    try:
        n = count_params(model, task, adapter)
    except ValueError as err:
        raise ConfigError([str(err).splitlines()[0]]) from None
    shard = sharding(trainer)
    strat = shard
    precision = str(trainer.get("precision", "32-true"))
    base_dtype = _dtype(model.get("dtype"), "model.dtype")
    half = HALF.get(precision.split("-")[0])
    if half is not None and precision.endswith("-true"):
        base_dtype = half  # Lightning casts the module to the half dtype
    compute = _dtype(strat.get("param_dtype"), "trainer.strategy.param_dtype") if strat.get("param_dtype") else None
    compute = compute or half or base_dtype
    full_ft = adapter.get("kind") is not None and attachment(adapter["kind"]).trains_backbone
    adapter_dtype = _dtype(adapter["dtype"], "adapter.dtype") if adapter.get("dtype") else None
    adapter_dtype = adapter_dtype or torch.promote_types(base_dtype, torch.float32)
    wb, ab, cb = _bytes(base_dtype), _bytes(adapter_dtype), _bytes(compute)
    trainable_base = n["total"] if full_ft else n["full_modules"]  # trained in their stored dtype (no fp32 master)
    trainable_bytes = trainable_base * wb + n["adapter"] * ab
    k = shard["shard"]
    batch, seq = tokens_per_step(task, n)
    tokens = batch * seq
    per_block = C_H * n["hidden"] + (C_I_GATED if n["gated"] else C_I_PLAIN) * n["intermediate"]
    ckpt = bool(strat.get("activation_checkpointing"))
    layers = n["layers"]
    act = tokens * cb * (layers * n["hidden"] + per_block if ckpt else layers * per_block + 3 * n["hidden"])
    logits = LOGIT_COPIES * tokens * n["vocab"] * 4
    b = {
        "frozen_weights": (n["total"] - trainable_base) * wb / k,
        "adapter_params": n["adapter"] * ab / k,
        "full_trained_params": trainable_base * wb / k,
        "optimizer_state": 2 * trainable_bytes / k,  # AdamW exp_avg + exp_avg_sq, in each parameter's dtype
        "gradients": trainable_bytes / k,
        "activations": act + logits,
        "fsdp_buffers": (2 * n["block"] * cb + n["block"] * (wb if full_ft else 0)) if k > 1 else 0,
    }
    static = b["frozen_weights"] + b["adapter_params"] + b["full_trained_params"] + b["optimizer_state"]
    accumulate = int(trainer.get("accumulate_grad_batches") or 1) > 1  # gradients live through the next forward
    grads_act = b["activations"] + b["gradients"] if accumulate else max(b["activations"], b["gradients"])
    peak = static + b["fsdp_buffers"] + grads_act
    gid = None
    if adapter_config(adapter).needs_plan:  # its plan comes from a GID warm-up before sharding (RaLoRA, GraLoRA k=auto)
        gid = gid_warmup_bytes(n, shard["world"], base_dtype, bool(model.get("load_on_rank0")))
        gid += layers * per_block * tokens * cb + logits
    return {
        "model": model.get("name"),
        "variant": adapter.get("name"),
        "source": source,
        "params": {k_: n[k_] for k_ in ("total", "targets", "target_modules", "adapter", "full_modules", "block")},
        "dims": {k_: n[k_] for k_ in ("hidden", "intermediate", "layers", "vocab", "gated")},
        "sharding": {k_: shard[k_] for k_ in ("strategy", "world", "shard")},
        "dtypes": {"weights": str(base_dtype), "adapter": str(adapter_dtype), "compute": str(compute)},
        "batch": batch,
        "seq": seq,
        "activation_checkpointing": ckpt,
        "bytes": b,
        "total_sum": sum(b.values()),
        "peak": peak,
        "gid_warmup": gid,
        "peak_with_warmup": max(peak, gid or 0),
        "assumptions": ASSUMPTIONS,
    }


ASSUMPTIONS = [
    "AdamW: 2 states per trainable parameter in that parameter's dtype; no fp32 master copy (Lightning's "
    "mixed precision and FSDP2 keep none), so full FT of a bf16 model keeps bf16 states",
    "adapters in adapter.dtype, default max(model dtype, fp32) (adapters/base.py)",
    f"activations per micro-batch: tokens x bytes x (layers x ({C_H}·hidden + {C_I_GATED}|{C_I_PLAIN}·intermediate)"
    " + 3·hidden) for gated|plain MLPs, SDPA/flash attention (no seq² scores); with activation checkpointing "
    "tokens x bytes x (layers·hidden + one block); plus 3 fp32 vocab-sized loss tensors (logits)",
    "peak = weights + optimizer + FSDP buffers + max(activations, gradients): activations are freed as "
    "gradients appear in backward; with accumulate_grad_batches > 1 gradients live through the next forward "
    "(peak = weights + optimizer + FSDP buffers + activations + gradients)",
    "FSDP buffers: 2 all-gathered blocks (prefetch) in the compute dtype (+ one block of gradients for full FT)",
    "GID warm-up (before sharding, busiest rank): full model + the fp32 gradient sums this rank owns (each "
    "target's sum lives on one rank, balanced by size; all of them on rank 0 with model.load_on_rank0) + one "
    "block's gradient + an fp32 copy of the largest target's gradient + the activations of one batch",
    "ignored: allocator fragmentation and caching, CUDA context (~0.5 GiB), NCCL buffers, the teacher of "
    "task=planted, optimizer-step temporaries, dataloader pinned memory",
]


# --------------------------------------------------------------------------------------------------------------
# output and the CLI
# --------------------------------------------------------------------------------------------------------------
def table(result: Mapping[str, Any]) -> str:
    """The plan as a small markdown table (GiB per GPU) with the total, the peak and the assumptions."""
    rows = [[k, f"{v / GIB:.2f}"] for k, v in result["bytes"].items()]
    rows.append(["sum of the above", f"{result['total_sum'] / GIB:.2f}"])
    rows.append(["**peak (training)**", f"{result['peak'] / GIB:.2f}"])
    if result["gid_warmup"] is not None:
        rows.append(["GID warm-up (before sharding)", f"{result['gid_warmup'] / GIB:.2f}"])
    s, p = result["sharding"], result["params"]
    head = (
        f"# Memory plan: {result['variant']} on {result['model']} ({result['source']})\n\n"
        f"{s['strategy']}, world {s['world']}, sharded over {s['shard']}; dtypes {result['dtypes']}; "
        f"micro-batch {result['batch']} x {result['seq']} tokens; activation checkpointing "
        f"{result['activation_checkpointing']}\nparams: {p['total']:,} total, {p['adapter']:,} adapter, "
        f"{p['full_modules']:,} in full-trained modules, {p['targets']:,} in {p['target_modules']} targets\n\n"
    )
    notes = "\n".join(f"- {a}" for a in result["assumptions"])
    return head + markdown_table(["component", "GiB per GPU"], rows) + "\n\nAssumptions:\n" + notes + "\n"


def plan_memory(cfg: DictConfig) -> dict[str, Any]:
    """Validate the non-model sections, estimate, and write <run_dir>/plan_memory.json; the estimate."""
    cfg = apply_method_settings(cfg)
    validate_config(cfg, check_model=False)
    result = estimate_memory(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "plan_memory.json", result)
    return result
