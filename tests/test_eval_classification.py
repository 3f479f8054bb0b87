"""Classification evaluation: STS-B regression, the GLUE suite and its metrics, T5 sequence classification (EOS),
image classification on tiny ViT and CLIP vision models, and the image suite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from lightning_ralora.data.tokenizer import byte_tokenizer
from lightning_ralora.evaluation.base import CLASSIFICATION_SUITES
from lightning_ralora.evaluation.glue import evaluate_glue, glue_average, glue_metrics, glue_score, split_metrics
from lightning_ralora.evaluation.image import evaluate_image
from lightning_ralora.modules.adapter_module import AdapterModule
from lightning_ralora.run.job import train
from lightning_ralora.tasks.classification import resolve_glue
from tests.conftest import make_cfg
from tests.helpers import pearson, spearman

BYTE_PAD, BYTE_EOS = 256, 258


def _confusion(p: list[int], y: list[int]) -> tuple[int, int, int, int]:
    tp = sum(a == 1 and b == 1 for a, b in zip(p, y, strict=True))
    tn = sum(a == 0 and b == 0 for a, b in zip(p, y, strict=True))
    fp = sum(a == 1 and b == 0 for a, b in zip(p, y, strict=True))
    fn = sum(a == 0 and b == 1 for a, b in zip(p, y, strict=True))
    return tp, tn, fp, fn


# --- metrics on fixed predictions ------------------------------------------------------------------------------
PREDS = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
LABELS = [1, 0, 0, 1, 0, 1, 1, 0, 1, 0]


def test_glue_binary_metrics_match_hand_computations() -> None:
    tp, tn, fp, fn = _confusion(PREDS, LABELS)
    acc = (tp + tn) / len(LABELS)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    f1 = 2 * tp / (2 * tp + fp + fn)
    cola = glue_metrics("cola", {"validation": (PREDS, LABELS)})
    assert cola == pytest.approx({"mcc": mcc, "score": mcc})
    mrpc = glue_metrics("mrpc", {"validation": (PREDS, LABELS)})
    assert mrpc == pytest.approx({"accuracy": acc, "f1": f1, "score": (acc + f1) / 2})
    assert glue_metrics("QQP", {"validation": (PREDS, LABELS)})["score"] == pytest.approx((acc + f1) / 2)
    for task in ("sst2", "qnli", "rte", "wnli"):
        assert glue_metrics(task, {"validation": (PREDS, LABELS)}) == pytest.approx({"accuracy": acc, "score": acc})


def test_glue_stsb_and_mnli_metrics_match_hand_computations() -> None:
    preds = [0.5, 2.0, 1.0, 4.5, 3.0, 3.5, 0.2]
    labels = [0.0, 2.4, 1.2, 5.0, 2.0, 3.8, 1.0]
    r, rho = pearson(preds, labels), spearman(preds, labels)
    out = glue_metrics("sts-b", {"validation": (preds, labels)})
    assert out == pytest.approx({"pearson": r, "spearman": rho, "score": (r + rho) / 2})
    ties = [1.0, 1.0, 2.0, 3.0, 3.0, 0.5, 4.0]  # Spearman with tied predictions: average ranks
    assert split_metrics("stsb", ties, labels)["spearman"] == pytest.approx(spearman(ties, labels), abs=1e-6)
    m_pred, m_lab = [0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 1, 2]
    mm_pred, mm_lab = [2, 2, 1, 0], [2, 1, 1, 0]
    mnli = glue_metrics("mnli", {"validation_matched": (m_pred, m_lab), "validation_mismatched": (mm_pred, mm_lab)})
    assert mnli == pytest.approx(
        {"accuracy_matched": 4 / 6, "accuracy_mismatched": 3 / 4, "score": (4 / 6 + 3 / 4) / 2}
    )


def test_glue_average_is_the_mean_of_the_eight_task_scores_without_wnli() -> None:
    scores = {
        "cola": 0.60,
        "sst2": 0.94,
        "mrpc": glue_score("mrpc", {"f1": 0.90, "accuracy": 0.86}),
        "qqp": 0.89,
        "stsb": glue_score("stsb", {"pearson": 0.90, "spearman": 0.88}),
        "mnli": glue_score("mnli", {"accuracy_matched": 0.86, "accuracy_mismatched": 0.84}),
        "qnli": 0.93,
        "rte": 0.80,
        "wnli": 0.10,  # not part of the average
    }
    hand = (0.60 + 0.94 + 0.88 + 0.89 + 0.89 + 0.85 + 0.93 + 0.80) / 8
    assert glue_average(scores) == pytest.approx(hand)
    with pytest.raises(ValueError, match="missing"):
        glue_average({k: v for k, v in scores.items() if k != "rte"})


def test_suites_are_registered_and_glue_task_sets_the_keys() -> None:
    assert CLASSIFICATION_SUITES["glue"] is evaluate_glue and CLASSIFICATION_SUITES["image"] is evaluate_image
    cfg = resolve_glue({"glue_task": "MNLI", "dataset": "nyu-mll/glue", "text_key": "sentence", "num_labels": 2})
    assert (cfg["text_key"], cfg["text_pair_key"], cfg["num_labels"]) == ("premise", "hypothesis", 3)
    assert (cfg["dataset_config"], cfg["val_split"]) == ("mnli", "validation_matched")


# --- text runs --------------------------------------------------------------------------------------------------
def _bert_hub(path: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        pad_token_id=BYTE_PAD,
    )  # fmt: skip
    tf.BertForPreTraining(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _hub_overrides(hub: Path, targets: str) -> list[str]:
    return [
        f"model.pretrained={hub}",
        f"model.tokenizer={hub}",
        "model.config=null",
        "model.name=hub_tiny",
        "model.family=seq_classification",
        f"model.target_modules=[{targets}]",
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_stsb_regression_trains_and_reports_pearsonspearman(tmp_path: Path) -> None:
    rows = [
        {"sentence1": "x" * n, "sentence2": "y" * (n % 3 + 1), "label": round(n / 4, 2), "idx": n} for n in range(1, 41)
    ]
    data = _write_jsonl(tmp_path / "stsb.jsonl", rows)
    hub = _bert_hub(tmp_path / "hub")
    overrides = [
        "task=classification",
        "task.glue_task=stsb",
        f"task.data_files={data}",
        "task.batch_size=8",
        "optim.lr=5e-3",
        *_hub_overrides(hub, "query,value"),
    ]
    results = train(make_cfg(tmp_path / "run", overrides))
    final = results["final_metrics"]
    assert {"val/pearson", "val/spearman"} <= set(final) and "val/acc" not in final
    assert math.isfinite(final["val/loss"])
    module = AdapterModule.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    module.eval()
    assert module.backbone.config.num_labels == 1 and module.backbone.config.problem_type == "regression"
    dm = module.task.datamodule()
    preds, labels = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            assert batch["labels"].dtype == torch.float32
            preds += module.backbone(**batch).logits[:, 0].tolist()
            labels += batch["labels"].tolist()
    assert final["val/pearson"] == pytest.approx(pearson(preds, labels), abs=1e-4)
    assert final["val/spearman"] == pytest.approx(spearman(preds, labels), abs=1e-4)
    # the GLUE suite on the same file (read as the validation split) reports the same numbers
    metrics, records = evaluate_glue(module, {"glue_task": "stsb", "data_files": str(data)})
    assert len(records) == len(rows) and records[0]["correct"] is None
    assert metrics["score"] == pytest.approx((metrics["pearson"] + metrics["spearman"]) / 2)


def _t5_hub(path: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.T5Config(
        vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, dropout_rate=0.0,
        decoder_start_token_id=BYTE_PAD, pad_token_id=BYTE_PAD, eos_token_id=BYTE_EOS,
    )  # fmt: skip
    tf.T5ForConditionalGeneration(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_t5_trains_and_evaluates_on_a_glue_pair_task(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    assert tok("ab", "cd")["input_ids"][-1] != tok.eos_token_id  # the byte tokenizer adds no EOS itself
    rows = [
        {"sentence1": f"{w} {i}", "sentence2": f"{w if i % 2 else 'other'} {i}", "label": i % 2, "idx": i}
        for i, w in enumerate(["cat", "dog", "sun", "sea"] * 10)
    ]
    data = _write_jsonl(tmp_path / "mrpc.jsonl", rows)
    hub = _t5_hub(tmp_path / "hub")
    overrides = [
        "task=classification",
        "task.glue_task=mrpc",
        f"task.data_files={data}",
        "task.batch_size=8",
        "task.max_length=12",
        *_hub_overrides(hub, "q,v"),
    ]
    results = train(make_cfg(tmp_path / "run", overrides))
    final = results["final_metrics"]
    assert {"val/acc", "val/f1", "val/mcc", "val/f1_binary"} <= set(final)
    module = AdapterModule.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    module.eval()
    assert type(module.backbone).__name__ == "T5ForSequenceClassification"
    assert "classification_head" in module.full_modules
    ids = module.task.encode("a long first sentence", "and a long second one")
    assert len(ids) == 12 and ids[-1] == BYTE_EOS and ids.count(BYTE_EOS) == 1
    eval_cfg = {"data_files": {"glue": str(data)}, "batch_size": 16}  # glue_task: the run's task.glue_task
    metrics, records = evaluate_glue(module, eval_cfg)
    assert set(metrics) == {"accuracy", "f1", "score", "n"} and metrics["n"] == len(rows)
    preds = [r["prediction"] for r in records]
    labels = [r["label"] for r in records]
    tp, tn, fp, fn = _confusion(preds, labels)
    assert metrics["accuracy"] == pytest.approx((tp + tn) / len(rows))
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert all(r["correct"] == (r["prediction"] == r["label"]) for r in records)
    assert {"text", "text_pair", "label", "prediction", "correct"} <= set(records[0])


# --- images -----------------------------------------------------------------------------------------------------
def _image_folder(root: Path, n: int = 12, size: int = 32) -> Path:
    """<root>/<class>/*.png: noisy blue (label 0, folders sort) and red (label 1) squares."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls, rgb in (("blue", (20, 40, 220)), ("red", (220, 30, 30))):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            noise = torch.randint(-25, 26, (size, size, 3), generator=gen)
            arr = (torch.tensor(rgb).view(1, 1, 3) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def _vision_model(kind: str) -> dict:
    """The model section of a tiny ViT or CLIP vision classifier built from a config (32x32 images)."""
    if kind == "vit":
        cfg = {"model_type": "vit", **VISION, "image_size": 32, "patch_size": 8}
        family, targets = "image_classification", "query,value,q_proj,v_proj"
    else:
        text = {**VISION, "vocab_size": 300}
        cfg = {
            "model_type": "clip",
            "vision_config": {**VISION, "image_size": 32, "patch_size": 8},
            "text_config": text,
            "projection_dim": 16,
        }
        family, targets = "clip_vision", "q_proj,v_proj"
    return {
        "name": f"tiny_{kind}",
        "family": family,
        "pretrained": None,
        "tokenizer": None,
        "config": cfg,
        "target_modules": targets.split(","),
    }


def _clip_hub(path: Path) -> dict:
    """A hub-format CLIP checkpoint (text and vision towers, CLIPModel) with its image processor, as
    openai/clip-vit-base-patch16 is: the vision tower loads into clip_vision, the classifier is new."""
    import transformers as tf

    cfg = _vision_model("clip")["config"]
    config = tf.CLIPConfig(
        vision_config=cfg["vision_config"], text_config=cfg["text_config"], projection_dim=cfg["projection_dim"]
    )
    torch.manual_seed(0)
    tf.CLIPModel(config).save_pretrained(path)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return {**_vision_model("clip"), "name": "tiny_clip_hub", "pretrained": str(path), "config": None}


@pytest.mark.parametrize("kind", ["vit", "clip", "clip_hub"])
def test_image_classification_trains_head_and_adapters(tmp_path: Path, kind: str) -> None:
    folder = _image_folder(tmp_path / "images")
    overrides = [
        "task=image_classification",
        f"task.data_dir={folder}",
        "task.num_labels=2",
        "task.batch_size=8",
        "task.val_fraction=0.25",
        "optim.lr=1e-2",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
    ]
    cfg = make_cfg(tmp_path / "run", overrides)
    with open_dict(cfg):
        model = _clip_hub(tmp_path / "hub") if kind == "clip_hub" else _vision_model(kind)
        cfg.model = OmegaConf.merge({k: v for k, v in cfg.model.items() if k != "config"}, model)
    results = train(cfg)
    assert results["final_metrics"]["val/acc"] > 0.5
    module = AdapterModule.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    module.eval()
    assert module.full_modules == ["classifier"] and module.adapter_layers()
    assert all(layer.lora_B.abs().sum() > 0 for layer in module.adapter_layers().values())  # adapters trained
    assert all(p.requires_grad for p in module.backbone.get_submodule("classifier").parameters())
    metrics, records = evaluate_image(module, {"data_dir": str(folder), "batch_size": 16})
    assert metrics["n"] == 24 and len(records) == 24
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 24)
    assert metrics["accuracy"] > 0.5
