"""Tasks: planted-update teacher, SFT masking and loading, classification metrics — each against a hand
computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_ralora.data.tokenizer import byte_tokenizer
from lightning_ralora.modules.adapter_module import AdapterModule
from lightning_ralora.run.job import train
from lightning_ralora.tasks.classification import ClassificationTask
from lightning_ralora.tasks.planted import planted_update
from lightning_ralora.tasks.sft import IGNORE, encode_pair, sft_collator
from lightning_ralora.tasks.text_data import load_split
from tests.conftest import make_cfg


def _entropy_rank(sigma: list[float]) -> float:
    p = [s / sum(sigma) for s in sigma]
    return math.exp(-sum(x * math.log(x) for x in p if x > 0))


def test_planted_teacher_is_base_plus_known_updates(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["task.profiles=[low,high,block]", "task.blocks=4", "task.rank=2"])  # 4 rank-1 blocks
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    teacher, planted = module.task.teacher, module.task.planted
    assert set(planted) == set(module.targets)
    for name in module.targets:
        w0 = module.backbone.get_submodule(name).weight.detach()
        delta = (teacher.get_submodule(name).weight - w0).detach()
        assert delta.norm() / w0.norm() == pytest.approx(cfg.task.strength, rel=1e-4)
        sigma = torch.linalg.svdvals(delta).tolist()
        assert planted[name]["erank"] == pytest.approx(_entropy_rank(sigma), rel=1e-3)
    by_profile = {}
    for info in planted.values():
        by_profile.setdefault(info["profile"], []).append(info["erank"])
    assert all(e == pytest.approx(_entropy_rank([1.0, 0.5]), rel=1e-3) for e in by_profile["low"])  # exp(H(2/3, 1/3))
    assert all(e == pytest.approx(4.0, rel=1e-3) for e in by_profile["block"])  # four equal rank-1 blocks
    assert min(by_profile["high"]) > 10
    # non-target weights are untouched
    for (n, p), (_, q) in zip(module.backbone.named_parameters(), teacher.named_parameters(), strict=True):
        if not any(n.startswith(t + ".") for t in module.targets):
            assert torch.equal(p, q), n


def test_planted_loss_is_kl_teacher_to_student(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    batch = torch.randint(0, 320, (3, 16))
    with torch.no_grad():
        p_t = F.softmax(module.task.teacher(input_ids=batch).logits, -1)
        p_s = F.softmax(module.backbone(input_ids=batch).logits, -1)
        by_hand = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        assert module.training_loss(batch) == pytest.approx(float(by_hand), rel=1e-4)
        assert by_hand > 0


def test_planted_block_profile_is_block_diagonal() -> None:
    w = planted_update(8, 12, "block", torch.Generator().manual_seed(0))
    assert w.norm() == pytest.approx(1.0)
    mask = torch.block_diag(*[torch.ones(2, 3)] * 4).bool()
    assert torch.count_nonzero(w[~mask]) == 0


def test_sft_labels_cover_only_the_response() -> None:
    tok = byte_tokenizer()
    item = encode_pair(tok, "2+3=", "5", max_length=64)
    assert item["input_ids"].tolist() == tok("2+3=5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert item["labels"].tolist() == [IGNORE] * 4 + item["input_ids"].tolist()[4:]
    short = encode_pair(tok, "2+3=", "5", max_length=3)  # too long: the prompt's start goes, a label stays
    assert short["input_ids"].tolist() == tok("3=5", add_special_tokens=False)["input_ids"]
    assert short["labels"].tolist() == [IGNORE, IGNORE, short["input_ids"][-1].item()]
    long_prompt = encode_pair(tok, "x" * 200, "answer", max_length=16)
    assert len(long_prompt["input_ids"]) == 16 and (long_prompt["labels"] != IGNORE).sum() == 7  # 6 bytes + eos


def test_sft_batches_pad_right_with_masked_labels() -> None:
    tok = byte_tokenizer()
    items = [encode_pair(tok, "1+1=", "2", 64), encode_pair(tok, "10+10=", "20", 64)]
    batch = sft_collator(tok)(items)
    n = max(len(it["input_ids"]) for it in items)
    for row, it in enumerate(items):  # by hand: content, then pad / mask 0 / label -100 up to the longest item
        k = len(it["input_ids"])
        assert batch["input_ids"][row].tolist() == it["input_ids"].tolist() + [tok.pad_token_id] * (n - k)
        assert batch["attention_mask"][row].tolist() == [1] * k + [0] * (n - k)
        assert batch["labels"][row].tolist() == it["labels"].tolist() + [IGNORE] * (n - k)


def test_sft_loads_local_jsonl_and_dataset_dir_like_the_hub(tmp_path: Path, sft_file: Path) -> None:
    train_ds, val_ds = load_split({"data_files": str(sft_file), "val_fraction": 0.25}, seed=0)
    assert len(train_ds) + len(val_ds) == 64 and len(val_ds) == 16
    # a hub dataset name is a directory of data files for datasets.load_dataset: same code path
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    (ds_dir / "train.jsonl").write_text(sft_file.read_text())
    hub_train, hub_val = load_split({"dataset": str(ds_dir), "val_fraction": 0.25}, seed=0)
    assert sorted(r["prompt"] for r in hub_train) == sorted(r["prompt"] for r in train_ds)


def test_sft_run_trains_on_response_tokens(tmp_path: Path, sft_file: Path) -> None:
    results = train(
        make_cfg(tmp_path, ["task=sft", f"task.data_files={sft_file}", "trainer.max_steps=16", "task.batch_size=8"])
    )
    assert math.isfinite(results["final_metrics"]["val/loss"])
    assert json.loads((tmp_path / "results.json").read_text())["task"] == "sft"


def test_classification_metrics_match_hand_computation() -> None:
    task = ClassificationTask({"num_labels": 2, "max_length": 8}, {"tokenizer": "bytes"})
    metrics = task.metrics()
    preds = torch.tensor([1, 0, 1, 1, 0, 0])
    labels = torch.tensor([1, 0, 0, 1, 1, 0])

    class Fixed(torch.nn.Module):
        def forward(self, **batch):
            return type("Out", (), {"logits": F.one_hot(preds, 2).float()})()

    task.update_metrics(metrics, Fixed(), {"input_ids": torch.zeros(6, 1), "labels": labels})
    got = {k: float(v) for k, v in metrics.compute().items()}
    tp, tn, fp, fn = 2, 2, 1, 1
    f1_pos, f1_neg = 2 * tp / (2 * tp + fp + fn), 2 * tn / (2 * tn + fn + fp)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert got["acc"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    assert got["mcc"] == pytest.approx(mcc)


def test_classification_run_reports_metrics(tmp_path: Path, cls_file: Path) -> None:
    results = train(
        make_cfg(
            tmp_path,
            ["model=tiny_llama_cls", "task=classification", f"task.data_files={cls_file}", "trainer.max_steps=20"],
        )
    )
    for key in ("val/acc", "val/f1", "val/mcc"):
        assert key in results["final_metrics"]
    assert 0.0 <= results["final_metrics"]["val/acc"] <= 1.0
    assert results["trainable_params"] < results["total_params"]
