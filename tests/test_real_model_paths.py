"""Numbers that feed paper tables on real-model paths: fp32 adapters on bf16 bases, train mode on pretrained
backbones, trainable task heads (through checkpoint and export), LoRA+ on every variant's B side."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ralora.adapters import LayerSpec, inject
from lightning_ralora.data.tokenizer import byte_tokenizer
from lightning_ralora.modules.adapter_module import AdapterModule, optimizer_groups
from lightning_ralora.run.job import train
from tests.conftest import make_cfg

SPECS = {
    "lora": LayerSpec(kind="lora", r=4, alpha=8),
    "rslora": LayerSpec(kind="lora", r=4, alpha=4, rslora=True),
    "ralora_n2": LayerSpec(kind="ralora", r=4, alpha=8, n_blocks=2),
    "gralora_k2": LayerSpec(kind="gralora", r=4, alpha=8, k=2),
    "hybrid_gralora": LayerSpec(kind="gralora", r=4, alpha=16, k=2, hybrid_r=4),
    "sds": LayerSpec(kind="sds", r=4, alpha=4),
}


def _bf16_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32)).to(torch.bfloat16)


def _train(net: nn.Module, steps: int, lr: float) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(32, 64).to(torch.bfloat16), torch.randn(32, 32)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        ((net(x).float() - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("case", sorted(SPECS))
def test_adapters_train_in_fp32_on_a_bf16_base(case: str) -> None:
    net = _bf16_net()
    layers = inject(net, ["0", "2"], SPECS[case])
    for layer in layers.values():
        assert layer.base.weight.dtype == torch.bfloat16
        tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
        adapter = {n: t for n, t in tensors.items() if not n.startswith("base.") and t.is_floating_point()}
        assert adapter and all(t.dtype == torch.float32 for t in adapter.values()), {
            n: t.dtype for n, t in adapter.items()
        }
    assert net(torch.randn(3, 64).to(torch.bfloat16)).dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    _train(net, steps=10, lr=2e-5)
    for name, p in net.named_parameters():
        if p.requires_grad:
            moved = (p.detach() != before[name]).float().mean().item()
            assert moved > 0.99, f"{name}: only {moved:.1%} of entries moved at lr 2e-5 in 10 steps"


def test_bf16_factors_would_not_move_at_a_small_learning_rate() -> None:
    """The control that makes the fp32 test meaningful: with adapter dtype bf16, A's entries do not move."""
    net = _bf16_net()
    layers = inject(net, ["0", "2"], SPECS["lora"], dtype=torch.bfloat16)
    a0 = {n: layer.lora_A.detach().clone() for n, layer in layers.items()}
    _train(net, steps=10, lr=2e-5)
    for n, layer in layers.items():
        assert layer.lora_A.dtype == torch.bfloat16
        assert (layer.lora_A != a0[n]).float().mean() < 0.2  # only the smallest entries move (fp32: > 99 %)


def test_sds_switch_on_a_bf16_base_keeps_the_update_and_orthonormal_bases() -> None:
    net = _bf16_net()
    layers = inject(net, ["0", "2"], SPECS["sds"])
    _train(net, steps=5, lr=1e-2)  # a non-trivial warm-up update
    for layer in layers.values():
        before = layer.delta_weight().detach().double()
        layer.reparameterize()
        after = layer.delta_weight().detach().double()
        assert before.norm() > 0
        assert ((after - before).norm() / before.norm()).item() < 1e-5
        eye = torch.eye(layer.r, dtype=torch.float64)
        for q in (layer.Q_A, layer.Q_B):
            assert q.dtype == torch.float32
            assert (q.double().T @ q.double() - eye).abs().max().item() < 1e-5


@pytest.mark.parametrize("adapter", ["lora", "gralora", "sds_lora", "dora"])
def test_module_adapters_are_fp32_on_a_bf16_model(tmp_path: Path, adapter: str) -> None:
    overrides = [f"adapter={adapter}", "model.dtype=bfloat16"] + (
        ["adapter.r=8", "adapter.k=2"] if adapter == "gralora" else []
    )
    cfg = make_cfg(tmp_path, overrides)
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    module.configure_model()
    trainable = {n: p for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in module.backbone.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    logits = module.backbone(input_ids=torch.randint(0, 320, (2, 8))).logits
    assert logits.dtype == torch.bfloat16


def test_lora_plus_reaches_every_b_side_factor_of_gralora(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["adapter=hybrid_gralora", "+adapter.lr_ratio_B=4"])
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    module.configure_model()
    groups = optimizer_groups(module.backbone, 1e-3, 4.0)
    assert [g["lr"] for g in groups] == [1e-3, 4e-3]
    layers = module.adapter_layers().values()
    want_b = {id(p) for layer in layers for p in (layer.gralora_B, layer.hybrid_B)}
    want_a = {id(p) for layer in layers for p in (layer.gralora_A, layer.hybrid_A)}
    assert {id(p) for p in groups[1]["params"]} == want_b
    assert {id(p) for p in groups[0]["params"]} == want_a


def test_lora_plus_reaches_peft_b_factors(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["adapter=dora", "+adapter.lr_ratio_B=4"])
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    module.configure_model()
    groups = optimizer_groups(module.backbone, 1e-3, 4.0)
    named = {n: p for n, p in module.backbone.named_parameters() if p.requires_grad}
    want_b = {id(p) for n, p in named.items() if ".lora_B." in n}  # peft's naming: ...lora_B.default.weight
    assert want_b and {id(p) for p in groups[1]["params"]} == want_b and groups[1]["lr"] == 4e-3
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in named.values()} - want_b


def test_trainable_modules_train_in_full_beside_the_adapters(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["model.trainable_modules=[norm]"])
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    module.configure_model()
    norm = module.backbone.get_submodule("model.norm")
    assert all(p.requires_grad for p in norm.parameters())
    lora = sum(layer.r * (layer.in_features + layer.out_features) for layer in module.adapter_layers().values())
    assert module.param_counts()["trainable_params"] == lora + cfg.model.config.hidden_size


# --- pretrained hub-format directories -----------------------------------------------------------------------------
BYTE_PAD = 256  # the byte tokenizer's <pad>


def _hub_dir(kind: str, path: Path) -> tuple[Path, list[str], list[str]]:
    """A hub-format directory (weights + tokenizer) holding a *pretraining* checkpoint, as on the hub: the
    sequence-classification head does not exist there and is initialised fresh by from_pretrained.
    Returns (dir, target modules, names of the head's parameters)."""
    import transformers as tf

    torch.manual_seed(0)
    tiny = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}
    encoder_targets = ["query", "key", "value", "dense"]
    if kind == "bert":
        config = tf.BertConfig(
            **tiny,
            num_attention_heads=2,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            pad_token_id=BYTE_PAD,
        )
        model, targets, head = tf.BertForPreTraining(config), encoder_targets, ["classifier"]
    elif kind == "roberta":
        config = tf.RobertaConfig(
            **tiny, num_attention_heads=2, hidden_dropout_prob=0.1, pad_token_id=BYTE_PAD, max_position_embeddings=300
        )
        model, targets, head = tf.RobertaForMaskedLM(config), encoder_targets, ["classifier"]
    else:
        config = tf.LlamaConfig(
            **tiny, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1, pad_token_id=BYTE_PAD
        )
        model, targets, head = tf.LlamaForCausalLM(config), ["q_proj", "k_proj", "v_proj", "o_proj"], ["score"]
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path, targets, head


def _pretrained_overrides(hub: Path, targets: list[str], family: str) -> list[str]:
    return [
        f"model.pretrained={hub}",
        f"model.tokenizer={hub}",
        "model.config=null",
        "model.name=hub_tiny",
        f"model.family={family}",
        f"model.target_modules=[{','.join(targets)}]",
    ]


def test_modules_missing_from_a_pretrained_checkpoint_train_in_full(tmp_path: Path, cls_file: Path) -> None:
    """A masked-LM checkpoint has no pooler: from_pretrained initialises it (and the head) fresh, so both must
    train in full and be saved, never adapted on top of random weights."""
    import transformers as tf

    config = tf.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    tf.BertForMaskedLM(config).save_pretrained(tmp_path / "hub")
    byte_tokenizer().save_pretrained(tmp_path / "hub")
    overrides = _pretrained_overrides(tmp_path / "hub", ["query", "value", "dense"], "seq_classification")
    cfg = make_cfg(tmp_path, ["task=classification", f"task.data_files={cls_file}", *overrides])
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    module.configure_model()
    assert set(module.full_modules) == {"classifier", "bert.pooler.dense"}
    assert "bert.pooler.dense" not in module.adapter_layers()
    pooler = module.backbone.get_submodule("bert.pooler.dense")
    assert isinstance(pooler, nn.Linear) and all(p.requires_grad for p in pooler.parameters())


class _ModeSpy:
    """Wraps AdapterModule.training_step to record the backbone's mode (and its dropouts') on every step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.modes: list[tuple[bool, list[bool]]] = []
        self.first_trainable: dict[str, torch.Tensor] = {}
        original = AdapterModule.training_step

        def spy(module: AdapterModule, batch, batch_idx):  # noqa: ANN001
            if not self.modes:
                self.first_trainable = {
                    n: p.detach().clone() for n, p in module.backbone.named_parameters() if p.requires_grad
                }
            dropouts = [m.training for m in module.backbone.modules() if isinstance(m, nn.Dropout)]
            self.modes.append((all(m.training for m in module.backbone.modules()), dropouts))
            return original(module, batch, batch_idx)

        monkeypatch.setattr(AdapterModule, "training_step", spy)


def _train_without_eval_warning(cfg) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = train(cfg)
    assert not [w for w in caught if "eval mode" in str(w.message)], "Lightning warned about eval-mode modules"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "roberta", "llama"])
def test_pretrained_encoder_classification_trains_its_new_head_in_train_mode(
    tmp_path: Path, cls_file: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForSequenceClassification

    hub, targets, head = _hub_dir(kind, tmp_path / "hub")
    spy = _ModeSpy(monkeypatch)
    run = tmp_path / "run"
    overrides = ["task=classification", f"task.data_files={cls_file}", "export=true"]
    cfg = make_cfg(run, [*overrides, *_pretrained_overrides(hub, targets, "seq_classification")])
    results = _train_without_eval_warning(cfg)
    # train mode on every step, dropout active where the model has nn.Dropout modules
    assert spy.modes and all(all_train and all(d) for all_train, d in spy.modes)
    if kind != "llama":
        assert spy.modes[0][1], "expected nn.Dropout modules in a BERT-style model"
    # the head is trainable, counted, not adapted, and it learned
    layers = results["structure"]["layers"]
    assert not any(name.split(".")[0] in head for name in layers), "the task head must not get an adapter"
    head_params = {n: p for n, p in spy.first_trainable.items() if n.split(".")[0] in head}
    assert head_params, f"no trainable parameter under {head}"
    adapters = sum(info["r"] * (info["in_features"] + info["out_features"]) for info in layers.values())
    assert results["trainable_params"] == adapters + sum(p.numel() for p in head_params.values())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for name, before in head_params.items():
        after = ckpt["state_dict"][f"backbone.{name}"]
        assert not torch.equal(after, before), f"{name} did not change"
    # adapter-only checkpoint + fresh head rebuilds the model; the export reloads with the same logits
    module = AdapterModule.from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    exported = AutoModelForSequenceClassification.from_pretrained(results["export_dir"]).eval()
    ids = torch.randint(0, 255, (3, 9))
    with torch.no_grad():
        ref = module.backbone(input_ids=ids).logits
        torch.testing.assert_close(exported(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert json.loads((run / "results.json").read_text())["trainable_params"] == results["trainable_params"]


@pytest.mark.slow
def test_pretrained_decoder_sft_trains_in_train_mode(
    tmp_path: Path, sft_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, targets, _ = _hub_dir("llama", tmp_path / "hub")
    spy = _ModeSpy(monkeypatch)
    cfg = make_cfg(
        tmp_path / "run", ["task=sft", f"task.data_files={sft_file}", *_pretrained_overrides(hub, targets, "causal_lm")]
    )
    results = _train_without_eval_warning(cfg)
    assert spy.modes and all(all_train for all_train, _ in spy.modes)
    assert results["trainable_params"] == sum(
        info["r"] * (info["in_features"] + info["out_features"]) for info in results["structure"]["layers"].values()
    )
