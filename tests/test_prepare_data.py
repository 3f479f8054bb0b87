"""Datasets are encoded once per node: `prepare_data` (local rank 0) writes a `Dataset.map` cache keyed by the data
and every encoding setting, `setup` (every rank) reads it; the examples are exactly the ones encoded before."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from lightning_ralora.data.datamodule import ListDataModule
from lightning_ralora.data.templates import render_prompt
from lightning_ralora.data.tokenizer import byte_tokenizer, load_tokenizer
from lightning_ralora.run.job import train
from lightning_ralora.tasks import sft as sft_module
from lightning_ralora.tasks.classification import ClassificationTask
from lightning_ralora.tasks.sft import SFTTask, encode_pair, sft_collator
from lightning_ralora.tasks.text_data import load_split, tokenizer_key
from tests.conftest import make_cfg, run_cli
from tests.helpers import save_special_tokenizer

N_ROWS = 64  # rows of the sft_file fixture


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private datasets cache (the loaded data and the encoding cache files land there)."""
    import datasets

    path = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", path)
    return path


def _sft(sft_file: Path, **overrides) -> SFTTask:
    cfg = {"data_files": str(sft_file), "max_length": 12, "batch_size": 4, "template": "alpaca", "val_fraction": 0.25}
    return SFTTask({**cfg, **overrides}, {"tokenizer": "bytes"}, seed=0)


def _counting_encode_pair(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of sft.encode_pair (the encoder every SFT row goes through)."""
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return encode_pair(*args, **kwargs)

    monkeypatch.setattr(sft_module, "encode_pair", counted)
    return calls


def test_cached_encoding_equals_encode_pair_of_each_row(hf_cache: Path, sft_file: Path) -> None:
    task = _sft(sft_file)
    node = task.datamodule()
    node.prepare_data()  # local rank 0
    assert node.encoded_examples == N_ROWS
    rank = task.datamodule()  # another rank of the node: reads the cache
    rank.setup("fit")
    assert rank.encoded_examples == 0
    tok = byte_tokenizer()  # the reference: the rows as load_split gives them, encoded one by one
    for got, rows in zip((rank.train, rank.val), load_split(task.cfg, seed=0), strict=True):
        assert len(got) == len(rows)
        for item, row in zip(got, rows, strict=True):
            ref = encode_pair(tok, render_prompt("alpaca", row["prompt"]), row["response"], 12)
            for key in ("input_ids", "labels"):
                assert item[key].dtype == ref[key].dtype and torch.equal(item[key], ref[key])
    # the collate function sees what it saw before: the same batch from the cached rows as from encode_pair's
    collate = sft_collator(tok)
    refs = [
        encode_pair(tok, render_prompt("alpaca", r["prompt"]), r["response"], 12) for r in load_split(task.cfg, 0)[0]
    ]
    batch, ref_batch = collate([rank.train[i] for i in range(4)]), collate(refs[:4])
    assert all(torch.equal(batch[k], ref_batch[k]) for k in ref_batch)


def test_changed_max_length_template_or_tokenizer_gets_its_own_cache_file(hf_cache: Path, sft_file: Path) -> None:
    base = _sft(sft_file)
    base_dm = base.datamodule()
    base_dm.prepare_data()
    train_rows, _ = load_split(base.cfg, seed=0)
    base_file = base_dm.source.cache_file(train_rows, "train")
    assert base_file is not None and Path(base_file).is_file()
    assert Path(base_file).parent in {Path(f["filename"]).parent for f in train_rows.cache_files}  # beside the data
    for overrides in ({"max_length": 8}, {"template": "none"}):
        other = _sft(sft_file, **overrides)
        dm = other.datamodule()
        assert dm.source.cache_file(train_rows, "train") != base_file
        dm.prepare_data()
        assert dm.encoded_examples == N_ROWS  # encoded anew, not read from the other setting's cache
        assert not torch.equal(dm.train[0]["input_ids"], base_dm.train[0]["input_ids"])
    edited = byte_tokenizer()
    edited.add_tokens(["<extra>"])
    assert tokenizer_key(edited) != tokenizer_key(byte_tokenizer())
    used = byte_tokenizer()
    before = tokenizer_key(used)
    used("a long text", truncation=True, max_length=3)  # sets the backend's truncation state: not the encoding
    assert tokenizer_key(used) == before == tokenizer_key(byte_tokenizer())


def test_add_special_tokens_gets_its_own_cache_file(hf_cache: Path, sft_file: Path, tmp_path: Path) -> None:
    """With a tokenizer that adds a BOS, task.add_special_tokens changes the encoding, so it names the cache file:
    each setting's cached rows are encode_pair's with that setting (BOS first, or none)."""
    tok_dir = save_special_tokenizer(tmp_path / "tok", "bos")
    tasks = {special: _sft(sft_file, add_special_tokens=special) for special in (True, False)}
    for task in tasks.values():
        task.tokenizer = load_tokenizer(str(tok_dir))
        task.model_cfg["tokenizer"] = str(tok_dir)
    train_rows, _ = load_split(tasks[True].cfg, seed=0)
    files = {special: t.datamodule().source.cache_file(train_rows, "train") for special, t in tasks.items()}
    assert files[True] != files[False]
    tok = tasks[True].tokenizer
    for special, task in tasks.items():
        dm = task.datamodule()
        dm.prepare_data()
        assert dm.encoded_examples == N_ROWS and Path(files[special]).is_file()
        rank = task.datamodule()
        rank.setup("fit")
        assert rank.encoded_examples == 0
        for item, row in zip(rank.train, train_rows, strict=True):
            ref = encode_pair(tok, render_prompt("alpaca", row["prompt"]), row["response"], 12, special)
            assert torch.equal(item["input_ids"], ref["input_ids"]) and torch.equal(item["labels"], ref["labels"])
            assert (item["input_ids"][0].item() == tok.bos_token_id) is special


def test_gzipped_jsonl_training_data(hf_cache: Path, sft_file: Path, tmp_path: Path) -> None:
    """task.data_files=...jsonl.gz: checked and loaded as its JSONL (datasets' json builder reads gzip), giving the
    same encoded rows as the plain file; a bad gzipped line is named as in a plain file."""
    gz = tmp_path / "sft.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(sft_file.read_text())
    assert SFTTask.validate(_sft(gz).cfg, {"family": "causal_lm", "tokenizer": "bytes"}) == []
    plain, zipped = _sft(sft_file).datamodule(), _sft(gz).datamodule()
    for a, b in zip(plain.train, zipped.train, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as fh:
        fh.write('{"prompt": "1+1=", "response": "2"}\nnot json\n')
    problems = SFTTask.validate(_sft(bad).cfg, {"family": "causal_lm", "tokenizer": "bytes"})
    assert len(problems) == 1 and f"task.data_files={bad}: line 2 is not valid JSON" in problems[0], problems


def test_second_prepare_reuses_the_cache(hf_cache: Path, sft_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_encode_pair(monkeypatch)
    task = _sft(sft_file)
    first = task.datamodule()
    first.prepare_data()
    assert calls[0] == N_ROWS
    first.prepare_data()  # Lightning calls it again for trainer.validate
    again = task.datamodule()  # a later process (a requeued job, the next run of a sweep)
    again.prepare_data()
    again.setup("fit")
    assert calls[0] == N_ROWS and again.encoded_examples == 0
    assert len(again.train) + len(again.val) == N_ROWS


def test_dataloaders_prepare_and_set_up_without_a_trainer(hf_cache: Path, sft_file: Path) -> None:
    task = _sft(sft_file)
    dm = task.datamodule()  # nothing loaded yet: a Trainer would call prepare_data and setup
    assert dm._train is None
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and dm.encoded_examples == N_ROWS
    assert sum(len(b["input_ids"]) for b in dm.val_dataloader()) == len(dm.val)


def test_in_memory_data_is_encoded_in_setup(hf_cache: Path, sft_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data kept in memory has no cache files: nothing is prepared and every process encodes it in setup."""
    import datasets

    cached = _sft(sft_file).datamodule()
    cached.setup("fit")  # no prepare: the cache is missing, setup encodes (and writes it)
    assert cached.encoded_examples == N_ROWS
    monkeypatch.setattr(datasets.config, "IN_MEMORY_MAX_SIZE", 10**9)
    dm = _sft(sft_file).datamodule()
    dm.prepare_data()
    assert dm.encoded_examples == 0
    dm.setup("fit")
    assert dm.encoded_examples == N_ROWS
    assert not dm.train.cache_files
    for a, b in zip(dm.train, cached.train, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("num_labels", [2, 1])
def test_classification_cache_equals_encode_of_each_row(hf_cache: Path, cls_file: Path, num_labels: int) -> None:
    """Integer labels stay ints, regression labels floats: the batches are the ones the eager lists gave."""
    cfg = {"data_files": str(cls_file), "max_length": 8, "batch_size": 4, "num_labels": num_labels}
    task = ClassificationTask(cfg, {"family": "seq_classification", "tokenizer": "bytes"}, seed=0)
    task.datamodule().prepare_data()
    dm = task.datamodule()
    dm.setup("fit")
    assert dm.encoded_examples == 0
    for got, rows in zip((dm.train, dm.val), load_split(task.cfg, seed=0), strict=True):
        refs = [{"input_ids": torch.tensor(task.encode(str(r["text"]))), "label": task.label(r["label"])} for r in rows]
        assert len(got) == len(refs)
        for item, ref in zip(got, refs, strict=True):
            assert torch.equal(item["input_ids"], ref["input_ids"]) and item["label"] == ref["label"]
            assert type(item["label"]) is type(ref["label"])
        batch, ref_batch = task.collate([got[i] for i in range(4)]), task.collate(refs[:4])
        assert all(torch.equal(batch[k], ref_batch[k]) and batch[k].dtype == ref_batch[k].dtype for k in ref_batch)


def _eager_datamodule(self: SFTTask) -> ListDataModule:
    """The SFT datamodule as it was built before: every row encoded in the caller's process, up front."""
    train_rows, val_rows = load_split(self.cfg, self.seed)
    pk, rk, n = self.cfg.get("prompt_key", "prompt"), self.cfg.get("response_key", "response"), self.cfg["max_length"]
    enc = [encode_pair(self.tokenizer, self.prompt(r[pk]), r[rk], n) for r in train_rows]
    enc_val = [encode_pair(self.tokenizer, self.prompt(r[pk]), r[rk], n) for r in val_rows]
    return ListDataModule(enc, enc_val, self.cfg["batch_size"], collate_fn=sft_collator(self.tokenizer), seed=self.seed)


@pytest.mark.slow
def test_training_on_the_cache_matches_the_eager_path(
    tmp_path: Path, hf_cache: Path, sft_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ["task=sft", f"task.data_files={sft_file}", "trainer.max_steps=6", "task.batch_size=4"]
    cached = train(make_cfg(tmp_path / "cached", overrides))
    assert cached["data_encoded_per_rank"] == [N_ROWS] and cached["global_step"] == 6
    monkeypatch.setattr(SFTTask, "datamodule", _eager_datamodule)
    eager = train(make_cfg(tmp_path / "eager", overrides))
    assert cached["adapter_state_digest_per_rank"] == eager["adapter_state_digest_per_rank"]
    assert cached["final_metrics"]["val/loss"] == eager["final_metrics"]["val/loss"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_ranks_read_what_local_rank_zero_encoded(tmp_path: Path, sft_file: Path) -> None:
    """2 ranks on CPU: rank 0 encodes every row, rank 1 none; the run ends as one where the data is kept in memory
    (no cache files, so each rank encodes it in setup, as every rank did before)."""
    common = ["debug=fast", "trainer=ddp", "trainer.devices=2", "task=sft", f"task.data_files={sft_file}"]
    common += ["trainer.max_steps=4", "trainer.val_check_interval=4", "task.batch_size=4"]
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    out = run_cli(tmp_path / "cached", *common, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = run_cli(tmp_path / "in_memory", *common, env={**env, "HF_DATASETS_IN_MEMORY_MAX_SIZE": str(10**9)})
    assert ref.returncode == 0, ref.stderr[-3000:]
    cached = json.loads((tmp_path / "cached" / "results.json").read_text())
    in_memory = json.loads((tmp_path / "in_memory" / "results.json").read_text())
    assert cached["world_size"] == 2
    assert cached["data_encoded_per_rank"] == [N_ROWS, 0]
    assert in_memory["data_encoded_per_rank"] == [N_ROWS, N_ROWS]
    assert len(set(cached["adapter_state_digest_per_rank"])) == 1
    assert cached["adapter_state_digest_per_rank"] == in_memory["adapter_state_digest_per_rank"]
    assert cached["final_metrics"]["val/loss"] == in_memory["final_metrics"]["val/loss"]
