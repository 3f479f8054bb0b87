"""Target selection and injection: peft-style suffix lists, full-match regexes, Conv1D refusal, atomicity."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_ralora.adapters import LayerSpec, LoRALinear, adapter_layers, find_targets, inject, merge_all


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_suffix_list_and_regex_select_the_same_layers() -> None:
    model = _llama()
    by_list = find_targets(model, ["q_proj", "v_proj"])
    by_regex = find_targets(model, r".*\.(q|v)_proj")
    assert by_list == by_regex == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")]


def test_inject_replaces_only_targets_and_freezes_the_rest() -> None:
    model = _llama()
    x = torch.randint(0, 64, (2, 5))
    before = model(input_ids=x).logits.detach()
    expected = find_targets(model, r".*(q_proj|down_proj)")
    replaced = inject(model, ["q_proj", "down_proj"], LayerSpec(kind="lora", r=2, alpha=4))
    assert list(replaced) == expected == list(adapter_layers(model))
    with pytest.raises(ValueError, match="matches no linear layer"):  # already adapted: nothing left to wrap
        find_targets(model, ["q_proj"])
    assert all(isinstance(layer, LoRALinear) for layer in replaced.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{f}" for name in replaced for f in ("lora_A", "lora_B")}
    torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)


def test_merge_all_restores_plain_linears_with_merged_weights() -> None:
    model = _llama()
    layers = inject(model, ["o_proj"], LayerSpec(kind="lora", r=2, alpha=4))
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
    x = torch.randint(0, 64, (2, 5))
    adapted = model(input_ids=x).logits.detach()
    merge_all(model)
    assert not adapter_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in layers)
    torch.testing.assert_close(model(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_is_refused_with_a_clear_message() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match=r"matches transformers Conv1D layers .*only torch.nn.Linear is supported"):
        find_targets(model, ["c_attn"])


def test_a_bad_spec_leaves_the_model_unchanged() -> None:
    model = _llama()
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"k_proj: .*adapter.k=3"):
        inject(model, ["k_proj", "q_proj"], LayerSpec(kind="gralora", r=6, alpha=4, k=3))
    assert [type(m) for m in model.modules()] == modules_before
    with pytest.raises(ValueError, match="adapter kind 'nope' unknown"):
        inject(model, ["q_proj"], LayerSpec(kind="nope", r=2, alpha=1))
