"""The variant registry: every variant describes itself; a toy variant registered from a test module (no package
file touched) passes the adapter contract, validates, trains from the CLI and appears in the diagnostics."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import tests.test_adapter_contract as contract
from lightning_ralora.adapters import ADAPTER_CLASSES, LayerSpec, inject
from lightning_ralora.adapters.attach import INJECT, attachment, attachments
from lightning_ralora.adapters.plan import uniform_plan
from lightning_ralora.adapters.registry import (
    PLUGINS_ENV,
    VARIANTS,
    adapter_config,
    check_adapter,
    get_variant,
    import_plugins,
    register_variant,
    spec_from_cfg,
    unregister_variant,
)
from lightning_ralora.adapters.schema import AdapterConfig, CallbackSpec
from lightning_ralora.core.errors import ConfigError
from lightning_ralora.diagnostics.alignment import effective_gradient, layer_metrics
from lightning_ralora.diagnostics.structure import block_terms
from lightning_ralora.modules.backbone import block_module_names
from lightning_ralora.run.validate import validate_config
from tests.adapter_cases import CASES, IN, OUT, Case
from tests.conftest import make_cfg, run_cli

BUILTIN_LAYER_KINDS = {"lora", "ralora", "gralora", "sds"}


@pytest.fixture
def toy():
    """The toy variant, registered for one test and removed afterwards."""
    import tests.toy_variant as toy_module

    toy_module.register()
    yield toy_module
    unregister_variant(toy_module.KIND)


def _toy_case(toy) -> Case:
    return Case(
        "diag_lora",
        lambda b: toy.DiagLoRALinear(b, r=4, alpha=8),
        lambda m, n: 4 * (m + n) + min(m, n),
    )


# --------------------------------------------------------------------------------------------------------------
# what a variant declares
# --------------------------------------------------------------------------------------------------------------
def test_builtin_kinds_are_registered_with_schema_and_layer() -> None:
    assert {"lora", "ralora", "gralora", "sds", "full", "peft"} <= set(VARIANTS)
    assert {k for k in VARIANTS if VARIANTS[k].layer is not None} >= BUILTIN_LAYER_KINDS
    assert VARIANTS["full"].layer is None and VARIANTS["peft"].layer is None
    assert set(ADAPTER_CLASSES) == {k for k, v in VARIANTS.items() if v.layer is not None}
    for kind, variant in VARIANTS.items():
        assert issubclass(variant.config, AdapterConfig) and variant.config.kind == kind
        for f in fields(variant.config):  # every field documents itself
            assert f.metadata.get("doc"), f"{variant.config.__name__}.{f.name} has no doc"


def test_every_registered_layer_kind_has_a_contract_case() -> None:
    covered = {case.build(nn.Linear(IN, OUT)).kind for case in CASES}
    assert {k for k in ADAPTER_CLASSES if k in BUILTIN_LAYER_KINDS} <= covered


def test_callbacks_come_from_the_config_as_lazy_import_paths() -> None:
    sds = adapter_config({"kind": "sds", "r": 4, "alpha": 4, "warmup_steps": 3, "K": 2})
    assert sds.callbacks() == [
        CallbackSpec("lightning_ralora.callbacks.sds_schedule:SDSSchedule", {"warmup_steps": 3, "K": 2})
    ]
    ralora = adapter_config({"kind": "ralora", "name": "ralora", "r": 4, "alpha": 8, "needs_gid": True})
    assert ralora.needs_plan
    assert ralora.callbacks() == [CallbackSpec("lightning_ralora.callbacks.gid_warmup:GIDWarmup", {"batches": 8})]
    assert adapter_config({"kind": "lora", "r": 4, "alpha": 8}).callbacks() == []


def test_adapters_import_no_lightning_hydra_or_diagnostics() -> None:
    code = (
        "import sys, lightning_ralora.adapters\n"
        "bad = ('lightning', 'hydra', 'omegaconf', 'peft', 'lightning_ralora.diagnostics')\n"
        "bad = [m for m in bad if m in sys.modules]\n"
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_spec_from_cfg_is_the_registry_job() -> None:
    cfg = {"kind": "gralora", "name": "gralora", "r": 8, "k": 2, "hybrid_r": 4, "alpha": 24, "dropout": 0.0}
    assert spec_from_cfg(cfg) == LayerSpec(kind="gralora", r=8, alpha=24.0, k=2, hybrid_r=4)
    # a uniform RaLoRA plan (no GID): n_blocks and the alpha/r_ref scale rule from the config
    ral = {"kind": "ralora", "name": "x", "r": 4, "r_ref": 8, "alpha": 16, "n_blocks": 2, "scale": "alpha/r_ref"}
    assert spec_from_cfg(ral) == LayerSpec(kind="ralora", r=4, alpha=16.0, n_blocks=2, scale=2.0)


def test_validate_names_each_field() -> None:
    assert check_adapter({"kind": "gralora", "r": 8, "k": 3, "alpha": 16}) == [
        "adapter.k=3 must divide adapter.r=8 (each block gets rank r/k)"
    ]
    assert check_adapter({"kind": "nope"}) == [f"adapter.kind='nope' is unknown; allowed: {sorted(VARIANTS)}"]
    problems = check_adapter({"kind": "lora", "r": 4, "alpha": 8, "rnak": 4})
    assert len(problems) == 1 and problems[0].startswith("adapter.rnak is not a field of adapter.kind='lora'")
    assert check_adapter({"kind": "full", "lr_ratio_B": 2.0})[0].startswith("adapter.lr_ratio_B=2.0 is LoRA+")


def test_layer_constructor_and_config_share_the_shape_rule() -> None:
    cfg = adapter_config({"kind": "sds", "r": 11, "alpha": 4})
    (problem,) = cfg.shape_problems(10, 12)
    with pytest.raises(ValueError) as err:
        VARIANTS["sds"].layer(nn.Linear(10, 12), r=11)
    assert problem in str(err.value)


def test_register_rejects_mismatched_or_duplicate_kinds(toy) -> None:
    with pytest.raises(ValueError, match="differs"):
        register_variant("other", toy.DiagLoRAConfig)
    with pytest.raises(ValueError, match="already registered"):
        register_variant("lora", toy.DiagLoRAConfig.__mro__[1])  # a different schema under a taken kind
    with pytest.raises(ValueError, match="unknown"):
        get_variant("no_such_kind")


@dataclass
class _BareConfig(AdapterConfig):
    """A kind with neither a layer class nor an attachment."""

    kind = "bare"


def test_a_kind_without_layers_must_say_how_it_attaches() -> None:
    with pytest.raises(ValueError, match="give attach="):
        register_variant("bare", _BareConfig)
    assert "bare" not in VARIANTS


# --------------------------------------------------------------------------------------------------------------
# how a variant meets the backbone (adapters/attach.py, full.py, peft_lora.py)
# --------------------------------------------------------------------------------------------------------------
def _two_linears() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 3))
    model.requires_grad_(False)
    return model


def test_full_and_peft_are_variants_carrying_their_attachment() -> None:
    """The module, the memory plan and the alignment callback read these answers instead of the kind's name."""
    assert all(attachment(k) is INJECT for k in BUILTIN_LAYER_KINDS)
    assert INJECT.uses_plan and not INJECT.trains_backbone and INJECT.alignment == "adapter_layers"
    full, peft = attachment("full"), attachment("peft")
    assert VARIANTS["full"].attach is full and VARIANTS["peft"].attach is peft
    assert full.trains_backbone and not full.uses_plan and full.alignment == "target_weights"
    assert not peft.trains_backbone and not peft.uses_plan and peft.alignment == "none" and peft.alignment_note
    assert attachments()[0] is INJECT and {full, peft} <= set(attachments())
    model = _two_linears()
    assert full.attach(model, ["0"], [], {"kind": "full"}, None) is model
    assert all(p.requires_grad for p in model.parameters())
    assert full.merge(model) is model and full.adapter_params(model, ["0"], {"kind": "full"}) == 0
    with pytest.raises(NotImplementedError, match="sharded peft model"):
        peft.rebuild(_two_linears(), ["0"], {"kind": "peft"}, None)
    with pytest.raises(ValueError, match="unknown"):
        attachment("no_such_kind")


def test_inject_attachment_builds_the_plan_and_counts_its_parameters() -> None:
    model = _two_linears()
    cfg = {"kind": "lora", "name": "lora", "r": 4, "alpha": 8, "compile": True}
    plan = uniform_plan(model, ["0"], spec_from_cfg(cfg), "lora")
    INJECT.attach(model, ["0"], ["2"], cfg, plan)
    layer = model[0]
    assert layer.kind == "lora" and layer.compiled and model[2].weight.requires_grad
    assert INJECT.b_side_parameters(model) == [layer.lora_B]
    assert INJECT.merge(model)[0] is layer.base
    assert INJECT.adapter_params(_two_linears(), ["0", "2"], cfg) == 4 * (IN + OUT) + 4 * (OUT + 3)
    with pytest.raises(ValueError, match="from a plan"):
        INJECT.attach(_two_linears(), ["0"], [], cfg, None)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_attachment_counts_what_peft_trains(dora: bool) -> None:
    """The memory plan's count of a peft adapter equals the trainable parameters of the model peft builds."""
    cfg = {"kind": "peft", "name": "peft", "r": 4, "alpha": 8, "peft": {"use_dora": dora}}
    peft = attachment("peft")
    wrapped = peft.attach(_two_linears(), ["0"], [], cfg, None)
    trained = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert peft.adapter_params(_two_linears(), ["0"], cfg) == trained == 4 * (IN + OUT) + dora * OUT
    assert [tuple(p.shape) for p in peft.b_side_parameters(wrapped)] == [(OUT, 4)]
    assert isinstance(peft.merge(wrapped)[0], nn.Linear)


# --------------------------------------------------------------------------------------------------------------
# the toy variant, registered through the registry alone
# --------------------------------------------------------------------------------------------------------------
CONTRACT_CHECKS = [
    contract.test_step0_output_equals_base,
    contract.test_forward_equals_dense_formula,
    contract.test_merge_unmerge_round_trip,
    contract.test_num_trainable_equals_formula,
    contract.test_only_adapter_parameters_change,
    contract.test_spec_rebuilds_same_structure,
]


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=[c.__name__ for c in CONTRACT_CHECKS])
def test_toy_passes_the_contract_matrix(toy, check) -> None:
    check(_toy_case(toy))


def test_toy_spec_round_trips_with_its_own_field(toy) -> None:
    layer = toy.DiagLoRALinear(nn.Linear(IN, OUT), r=2, alpha=4, diag=False)
    d = layer.spec().to_dict()
    assert d["extra"] == {"diag": False}
    rebuilt = ADAPTER_CLASSES[toy.KIND].from_spec(nn.Linear(IN, OUT), LayerSpec.from_dict(json.loads(json.dumps(d))))
    assert not hasattr(rebuilt, "diag_d") and rebuilt.num_trainable == 2 * (IN + OUT)
    # built-in specs serialise exactly as before (no `extra` key): old plans and checkpoints stay readable
    assert "extra" not in LayerSpec(kind="lora", r=2, alpha=4).to_dict()
    old = {"kind": "ralora", "r": 2, "alpha": 4.0, "dropout": 0.0, "rslora": False, "n_blocks": 2, "k": 1}
    assert LayerSpec.from_dict({**old, "hybrid_r": 0, "scale": None}).n_blocks == 2


def test_toy_validates_and_injects_via_the_registry(toy, tmp_path: Path) -> None:
    assert check_adapter({"kind": toy.KIND, "r": 4, "alpha": 8, "diag": "yes"}) == [
        "adapter.diag must be true or false, got 'yes'"
    ]
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 3))
    layers = inject(model, ["0"], spec_from_cfg({"kind": toy.KIND, "r": 4, "alpha": 8}))
    assert isinstance(layers["0"], toy.DiagLoRALinear)
    # the shape rule runs on the meta skeleton before any compute (tiny Llama k/v projections are 32 wide)
    c = OmegaConf.to_container(make_cfg(tmp_path), resolve=True)
    c["adapter"] = {"name": "toy", "kind": toy.KIND, "r": 40, "alpha": 8, "diag": True}
    with pytest.raises(ConfigError) as err:
        validate_config(c)
    assert "adapter.r=40 must be <= min(in_features, out_features)=32" in str(err.value)
    assert all(line.count("adapter.r=40") == 1 for line in err.value.problems)


def test_toy_appears_in_the_diagnostics(toy) -> None:
    torch.manual_seed(0)
    layer = toy.DiagLoRALinear(nn.Linear(IN, OUT), r=4, alpha=8)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
    s, terms = block_terms(layer, "jacobian")
    assert s == layer.scaling and len(terms) == 2
    G = torch.randn(OUT, IN)
    closed = effective_gradient(layer, G, "closed")
    torch.testing.assert_close(closed, effective_gradient(layer, G, "generic"), rtol=1e-4, atol=1e-4)
    from lightning_ralora.diagnostics.structure import equivalent_factors

    fs, fterms = block_terms(layer, "factors")
    B_eq, A_eq = equivalent_factors(fterms, (OUT, IN))
    torch.testing.assert_close(fs * B_eq @ A_eq, layer.delta_weight().detach(), rtol=1e-5, atol=1e-5)
    m = layer_metrics(layer, G)
    assert 0 < m["cos_f"] <= 1 + 1e-6 and 0 <= m["kappa"] <= 1 + 1e-6


def test_import_plugins_reads_the_config_key_and_the_environment(monkeypatch) -> None:
    unregister_variant("diag_lora")
    sys.modules.pop("tests.toy_variant", None)
    monkeypatch.setenv(PLUGINS_ENV, "tests.toy_variant")
    try:
        assert import_plugins({}) == ["tests.toy_variant"]
        assert "diag_lora" in VARIANTS
        monkeypatch.delenv(PLUGINS_ENV)
        assert import_plugins({"plugins": ["tests.toy_variant"]}) == ["tests.toy_variant"]
        with pytest.raises(ImportError, match="no_such_plugin_module"):
            import_plugins({"plugins": "no_such_plugin_module"})
    finally:
        unregister_variant("diag_lora")


def test_toy_trains_from_the_cli(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "adapter"
    conf.mkdir(parents=True)
    (conf / "diag_lora.yaml").write_text(
        "name: diag_lora\nkind: diag_lora\nr: 4\nalpha: 8\ndropout: 0.0\ndiag: true\nlr_ratio_B: 1.0\n"
        "target_modules: null\n"
    )
    run_dir = tmp_path / "run"
    res = run_cli(
        run_dir,
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "debug=fast",
        "adapter=diag_lora",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        env={PLUGINS_ENV: "tests.toy_variant"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    layers = results["structure"]["layers"]
    assert layers and all(v["kind"] == "diag_lora" and v["extra"] == {"diag": True} for v in layers.values())
    assert results["global_step"] == 4


# --------------------------------------------------------------------------------------------------------------
# FSDP wrapping units (AdapterModule._shard, modules.backbone.block_module_names)
# --------------------------------------------------------------------------------------------------------------
def _tiny(family: str) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification, ViTConfig, ViTForImageClassification

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    with torch.device("meta"):
        if family == "roberta":
            return RobertaForSequenceClassification(RobertaConfig(vocab_size=100, **small))
        return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, **small))


@pytest.mark.parametrize(("family", "layer"), [("roberta", "RobertaLayer"), ("vit", "ViTLayer")])
def test_fsdp_blocks_come_from_no_split_modules(family: str, layer: str) -> None:
    model = _tiny(family)
    names = block_module_names(model)
    assert layer in names  # the old class-name suffix heuristic missed these
    encoder_layers = [m for m in model.modules() if type(m).__name__ == layer]
    assert len(encoder_layers) == 2
    assert not any(n.endswith(("DecoderLayer", "Block")) for n in names)


def test_fsdp_blocks_fall_back_to_the_class_name_heuristic() -> None:
    class MyBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    assert block_module_names(nn.Sequential(MyBlock(), MyBlock())) == {"MyBlock"}
