"""Section 6: the papers' shapes. Layers of LLaMA-3.1-8B and Gemma-2B at r ∈ {8, 16, 64} (forward + backward with
input gradients), a training step of an 8B-width Llama with 2 layers, and saved activations per variant; every
variant side by side with our LoRA, peft and the frozen floor (CPU: fp32 with few tokens; CUDA: bf16)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks.common import Env, Figure, calibrate_inner, call_sampler, ratio_figure, round_robin, summarize
from benchmarks.layer import _step_fn
from benchmarks.variants import _Holder, prepare_layers

LLAMA = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)}
GEMMA = {"q/o": (2048, 2048), "k/v (MQA)": (2048, 256), "gate/up": (2048, 16384), "down": (16384, 2048)}
# (model, projection, in, out, r): every projection at r = 16, the two largest LLaMA ones at r = 8 and 64 too
FULL_LAYERS = [
    *(("LLaMA-8B", p, i, o, 16) for p, (i, o) in LLAMA.items()),
    *(("Gemma-2B", p, i, o, 16) for p, (i, o) in GEMMA.items()),
    *(("LLaMA-8B", p, *LLAMA[p], r) for r in (8, 64) for p in ("q/o", "gate/up")),
]
QUICK_LAYERS = [("tiny", "q", 32, 32, 8), ("tiny", "kv", 32, 16, 8)]
TOKENS = {"cpu": 256, "cuda": 8192}
# LlamaConfig of the step: 8B width (hidden 4096, intermediate 14336, 32 heads, 8 kv heads), 2 layers, small vocab
FULL_MODEL = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
QUICK_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
STEP_SHAPE = {"cpu": (1, 128), "cuda": (4, 2048)}  # (batch, seq_len)
TARGETS_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRID = 4  # GraLoRA's k and RaLoRA's block count here
LAYER_VARIANTS = ("floor", "lora", "ralora", "gralora", "hybrid", "sds", "peft_lora", "peft_gralora")
LAYER_VARIANTS += ("lora_compiled", "sds_compiled")  # adapter.compile=true
STEP_VARIANTS = ("floor", "lora", "ralora", "gralora", "hybrid", "sds", "peft_lora", "peft_gralora")
DESCRIPTIONS = {
    "floor": "frozen linear / model, no adapter (backward for input gradients only)",
    "lora": "our LoRA r, alpha 2r",
    "ralora": f"our RaLoRA r, {GRID} blocks",
    "gralora": f"our GraLoRA r, k={GRID}",
    "hybrid": f"our Hybrid GraLoRA: grid rank r/2 (k={GRID}) + dense rank r/2",
    "sds": "our SDS-LoRA r (SDS phase, after the switch)",
    "peft_lora": "peft LoRA r",
    "peft_gralora": f"peft GraLoRA r, gralora_k={GRID}",
    "lora_compiled": "our LoRA r with adapter.compile=true (torch.compile of the update)",
    "sds_compiled": "our SDS-LoRA r (SDS phase) with adapter.compile=true",
    # the GPU acceptance run's further presets (benchmarks/gpu)
    "rslora": "our rsLoRA r, alpha 2r, scale alpha/sqrt(r)",
    "ralora_pro": "RaLoRA-Pro's layer (RaLoRALinear) at r, 2 blocks: its plan differs from RaLoRA's, not its kernel",
    "peft_dora": "peft DoRA r",
}
COMPILED = "_compiled"


def spec(variant: str, r: int) -> Any:
    """Our LayerSpec of `variant` at rank r (equal trainable parameters r(m+n) for every variant)."""
    from lightning_ralora.adapters.registry import VARIANTS

    cfgs = {
        "lora": ("lora", {"alpha": 2.0 * r}),
        "rslora": ("lora", {"alpha": 2.0 * r, "rslora": True}),
        "ralora_pro": ("ralora", {"alpha": 2.0 * r, "n_blocks": 2, "scale": None}),
        "ralora": ("ralora", {"alpha": 2.0 * r, "n_blocks": GRID, "scale": None}),
        "gralora": ("gralora", {"alpha": 2.0 * r, "k": GRID}),
        "hybrid": ("gralora", {"alpha": 2.0 * r, "k": GRID, "hybrid_r": r // 2}),
        "sds": ("sds", {"alpha": 4.0}),
    }
    kind, kw = cfgs[variant]
    rank = r // 2 if variant == "hybrid" else r
    return VARIANTS[kind].config(r=rank, **kw).to_spec()


def peft_config(variant: str, r: int, targets: list[str]) -> Any:
    """peft's LoRA, DoRA or GraLoRA at rank r."""
    from peft import LoraConfig

    if variant in ("peft_lora", "peft_dora"):
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=variant == "peft_dora")
    from peft import GraloraConfig

    return GraloraConfig(r=r, alpha=2 * r, gralora_k=GRID, target_modules=targets)


def build_layer(variant: str, base: nn.Linear, r: int) -> nn.Module:
    """`base` (shared, frozen) adapted by `variant` at rank r, or bare for the floor."""
    from lightning_ralora.adapters import ADAPTER_CLASSES

    base = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})  # a new module, the same frozen weight
    if variant == "floor":
        return base.requires_grad_(False)
    if variant.startswith("peft_"):
        from peft import get_peft_model

        return get_peft_model(_Holder(base), peft_config(variant, r, ["lin"])).base_model.model.lin
    s = spec(variant.removesuffix(COMPILED), r)
    layer = ADAPTER_CLASSES[s.kind].from_spec(base, s)
    prepare_layers(_Holder(layer))
    layer.compiled = variant.endswith(COMPILED)
    return layer


def run_layers(
    env: Env,
    shapes: list[tuple[str, str, int, int, int]] | None = None,
    variants: tuple[str, ...] = LAYER_VARIANTS,
    autocast: torch.dtype | None = None,
    min_sample_s: float | None = None,
) -> tuple[dict[str, Any], list[Figure]]:
    """Every layer variant on each paper shape, interleaved; ratios against our LoRA, peft and the floor.
    `shapes`, `variants`, `autocast` (forward under torch.autocast) and `min_sample_s` default to this section's."""
    shapes = shapes or (QUICK_LAYERS if env.quick else FULL_LAYERS)
    tokens = 16 if env.quick else TOKENS[env.device.type]
    repeats = env.repeats.get("paper", 2 if env.quick else 5)
    min_sample_s = min_sample_s or (0.001 if env.quick else 0.3)
    raw: dict[str, Any] = {}
    figures: list[Figure] = []
    for model_name, proj, n_in, n_out, r in shapes:
        where = f"{model_name} {proj} {n_in}→{n_out} r={r}"
        torch.manual_seed(0)
        base = nn.Linear(n_in, n_out, bias=False).to(env.device, env.dtype).requires_grad_(False)
        x = torch.randn(tokens, n_in, device=env.device, dtype=env.dtype, requires_grad=True)
        grad_out = torch.randn(tokens, n_out, device=env.device, dtype=env.dtype)
        samplers = {}
        for v in variants:
            fn = _step_fn(build_layer(v, base, r).train(), x, grad_out, autocast)
            samplers[v] = call_sampler(fn, env, calibrate_inner(fn, env, min_sample_s))
        times = round_robin(samplers, repeats)
        raw[where] = {"tokens": tokens, "times_s": {v: summarize(t) for v, t in times.items()}}
        figures += _figures(f"paper/layer/{model_name}/{proj}/r{r}", f"layer {where}", times)
    return raw, figures


def _figures(key: str, where: str, times: dict[str, list[float]]) -> list[Figure]:
    """The issue's ratios for one layer shape or model step."""
    sec = "paper"
    if not {"lora", "floor", "peft_lora", "gralora", "peft_gralora"} <= set(times):
        # a reduced set (a reference missing, e.g. an older peft without GraLoRA): every variant against our LoRA
        ref = "lora" if "lora" in times else next(iter(times))
        plain = [v for v in times if v != ref and not v.endswith(COMPILED)]
        figs = [ratio_figure(f"{key}/{v}_vs_{ref}", sec, f"{where}: {v} / {ref}", times, v, ref) for v in plain]
        return figs + _compiled_figures(key, where, times)
    figs = [
        ratio_figure(
            f"{key}/lora_vs_floor",
            sec,
            f"{where}: our LoRA / frozen floor",
            times,
            "lora",
            "floor",
            "paper_lora_vs_floor",
        ),
        ratio_figure(
            f"{key}/lora_vs_peft_lora",
            sec,
            f"{where}: our LoRA / peft LoRA",
            times,
            "lora",
            "peft_lora",
            "paper_lora_vs_peft_lora",
        ),
        ratio_figure(
            f"{key}/peft_lora_vs_floor", sec, f"{where}: peft LoRA / frozen floor", times, "peft_lora", "floor"
        ),
        ratio_figure(
            f"{key}/gralora_vs_peft_gralora",
            sec,
            f"{where}: our GraLoRA / peft GraLoRA (k={GRID})",
            times,
            "gralora",
            "peft_gralora",
            "paper_gralora_vs_peft_gralora",
        ),
    ]
    for v, name in (
        ("rslora", "rsLoRA"),
        ("ralora_pro", "RaLoRA-Pro's layer (2 blocks)"),
        ("peft_dora", "peft DoRA"),
    ):
        if v in times:
            figs.append(ratio_figure(f"{key}/{v}_vs_lora", sec, f"{where}: {name} / our LoRA", times, v, "lora"))
    for v, name in (
        ("ralora", f"RaLoRA ({GRID} blocks)"),
        ("gralora", f"GraLoRA (k={GRID})"),
        ("hybrid", "Hybrid GraLoRA"),
        ("sds", "SDS-LoRA (SDS phase)"),
    ):
        figs.append(
            ratio_figure(
                f"{key}/{v}_vs_lora", sec, f"{where}: {name} / our LoRA", times, v, "lora", "paper_variant_vs_lora"
            )
        )
    return figs + _compiled_figures(key, where, times)


def _compiled_figures(key: str, where: str, times: dict[str, list[float]]) -> list[Figure]:
    """adapter.compile on / off for the variants timed both ways."""
    return [
        ratio_figure(f"{key}/{v}_compiled_vs_eager", "paper", f"{where}: {v} compiled / eager", times, v + COMPILED, v)
        for v in ("lora", "sds")
        if v + COMPILED in times and v in times
    ]


def build_model(env: Env) -> nn.Module:
    """The frozen 8B-width Llama with 2 layers (random weights), shared by every variant of the step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = QUICK_MODEL if env.quick else FULL_MODEL
    cfg = LlamaConfig(**dims, num_hidden_layers=2, vocab_size=64 if env.quick else 512, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(env.device):
        model = LlamaForCausalLM(cfg).to(env.dtype)
    return model.requires_grad_(False)


def adapt_model(base: nn.Module, variant: str, r: int) -> nn.Module:
    """A copy of `base` sharing its frozen weights, adapted by `variant` on every projection."""
    from lightning_ralora.adapters import find_targets, inject

    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    # the embedding output asks for gradients, so every variant (and the floor) runs the whole backward
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    if variant == "floor":
        return model
    if variant.startswith("peft_"):
        from peft import get_peft_model

        return get_peft_model(model, peft_config(variant, r, TARGETS_LLAMA))
    inject(model, find_targets(model, TARGETS_LLAMA), spec(variant, r))
    prepare_layers(model)
    return model


def _train_step_fn(model: nn.Module, batch: torch.Tensor, autocast: torch.dtype | None = None) -> Any:
    """Forward, causal-LM loss, backward, AdamW step, zero_grad; with `autocast` the forward runs under
    `torch.autocast` of that dtype (Lightning's bf16-mixed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    amp = torch.autocast(batch.device.type, dtype=autocast, enabled=autocast is not None)

    def step() -> None:
        with amp:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def run_step(env: Env, r: int = 16) -> tuple[dict[str, Any], list[Figure]]:
    """Training steps of the 2-layer 8B-width Llama per variant, interleaved (one step per sample)."""
    base = build_model(env)
    b, s = (2, 8) if env.quick else STEP_SHAPE[env.device.type]
    batch = torch.randint(0, base.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    batch = batch.to(env.device)
    repeats = env.repeats.get("paper", 1 if env.quick else 3)
    samplers = {v: call_sampler(_train_step_fn(adapt_model(base, v, r), batch), env) for v in STEP_VARIANTS}
    times = round_robin(samplers, repeats)
    where = f"step 2-layer Llama {base.config.hidden_size}/{base.config.intermediate_size} r={r}, {b}x{s} tokens"
    raw = {
        "model": {**(QUICK_MODEL if env.quick else FULL_MODEL), "layers": 2},
        "batch": [b, s],
        "times_s": {v: summarize(t) for v, t in times.items()},
    }
    return raw, _figures("paper/step", where, times)


def saved_bytes(fn: Any, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs (storages in `exclude`, the
    parameters', left out): the activation memory a layer holds until its backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_memory(env: Env) -> tuple[dict[str, Any], list[Figure]]:
    """Saved activations of one adapted 8B-shape layer per variant against our LoRA (and the frozen floor), and
    what checkpointing GraLoRA's update (recomputing its k× larger intermediate in backward) gives back."""
    shapes = {"tiny 32→32": (32, 32)} if env.quick else {f"LLaMA-8B {k}": LLAMA[k] for k in ("gate/up", "down")}
    tokens, r = (16, 8) if env.quick else (TOKENS[env.device.type], 16)
    raw: dict[str, Any] = {}
    figures: list[Figure] = []
    for name, (n_in, n_out) in shapes.items():
        torch.manual_seed(0)
        base = nn.Linear(n_in, n_out, bias=False).to(env.device, env.dtype).requires_grad_(False)
        x = torch.randn(tokens, n_in, device=env.device, dtype=env.dtype, requires_grad=True)
        got: dict[str, int] = {}
        for v in LAYER_VARIANTS:
            layer = build_layer(v, base, r).train()
            params = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
            got[v] = saved_bytes(lambda layer=layer, x=x: layer(x), params)
            if v == "gralora":
                got["gralora_ckpt"] = saved_bytes(
                    lambda layer=layer, x=x: layer.base(x) + checkpoint(layer.update, x, use_reentrant=False),
                    params,
                )
        raw[name] = {"tokens": tokens, "r": r, "saved_bytes": got}
        for v in [*LAYER_VARIANTS[2:], "gralora_ckpt"]:
            ratio = got[v] / got["lora"]
            extra = (got[v] - got["floor"]) / max(1, got["lora"] - got["floor"])
            figures.append(
                Figure(
                    f"paper/memory/{name}/{v}_vs_lora",
                    "paper",
                    f"activations {name} r={r}, {tokens} tokens: {v} / our LoRA (saved for backward)",
                    {**summarize([ratio]), "ratio_of_medians": ratio},
                    note=f"above the floor: {extra:.2f}× LoRA's {(got['lora'] - got['floor']) / 2**20:.2f} MiB",
                )
            )
    return raw, figures


def run(env: Env) -> dict[str, Any]:
    """Layers at the papers' shapes, the 8B-width model step and the activation memory per variant."""
    layers_raw, figures = run_layers(env)
    step_raw, step_figs = run_step(env)
    mem_raw, mem_figs = activation_memory(env)
    return {
        "config": {"variants": DESCRIPTIONS, "grid": GRID, "tokens": TOKENS, "step_shape": STEP_SHAPE},
        "raw": {"layers": layers_raw, "step": step_raw, "activation_memory": mem_raw},
        "figures": figures + step_figs + mem_figs,
    }
