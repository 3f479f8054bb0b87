"""RunRecord, the one type of results.json: a record saved and loaded again is the same record and the same JSON
(keys the type does not name and keys held as null included), the training path's records load and save again
unchanged, a failed or stopped run's record loads with its status, and an evaluation's amendment keeps the rest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_ralora.callbacks.divergence import Diverged
from lightning_ralora.cli.eval import main as eval_main
from lightning_ralora.core.signals import Interrupted, StopRequest
from lightning_ralora.run.job import train
from lightning_ralora.run.outcome import failure_record
from lightning_ralora.run.record import ATTEMPTS, RESULTS, SWEEP_ID_ENV, RunRecord
from lightning_ralora.run.rehearsal import rehearsal_data
from tests.conftest import make_cfg


@pytest.fixture(autouse=True)
def no_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SWEEP_ID_ENV, raising=False)


def _text(data: dict) -> str:
    """results.json's text for `data` (io.write_json_atomic's format)."""
    return json.dumps(data, indent=2, default=str) + "\n"


def test_a_saved_record_loads_as_the_same_record(tmp_path: Path) -> None:
    record = RunRecord(
        variant="lora",
        model="tiny_llama",
        task="planted",
        seed=3,
        final_metrics={"val/loss": 0.5},
        plan=None,
        status="completed",
        config={"adapter": {"r": 8, "hybrid_r": 4}},
        eval={"gsm8k": {"accuracy": 0.25, "n": 8}},
        extra={"gpu": "none"},
    )
    path = record.save(tmp_path)
    assert path == tmp_path / RESULTS
    loaded = RunRecord.load(tmp_path)
    assert loaded == record
    assert loaded.sweep_id is None and loaded.recorded_at is not None  # write_record's keys
    assert RunRecord.load(path) == record  # the file itself, too
    on_disk = json.loads(path.read_text())
    assert on_disk == {"sweep_id": None, **record.to_dict(), "recorded_at": loaded.recorded_at}
    assert on_disk["gpu"] == "none" and "plan" not in on_disk  # a field never set is not written


def test_a_fresh_record_writes_only_what_is_set_in_field_order() -> None:
    record = RunRecord(error="completed earlier", status="skipped")
    assert list(record.to_dict().items()) == [("status", "skipped"), ("error", "completed earlier")]


def test_unknown_keys_null_keys_and_key_order_round_trip(tmp_path: Path) -> None:
    """An older or other record (no status, a key this type does not name, a key held as null) is the same JSON
    after load and save, byte for byte apart from the time it was recorded."""
    data = {
        "layers": {"q": {"erank": 3.5}},
        "variant": "ralora",
        "seed": 0,
        "plan": None,
        "model": "llama",
        "newer_writer_key": [1, 2],
        "config": {"experiment_name": "ralora_gid"},
    }
    src = tmp_path / "gid_profile.json"
    src.write_text(_text(data))
    record = RunRecord.load(src)
    assert record.extra == {"layers": {"q": {"erank": 3.5}}, "newer_writer_key": [1, 2]}
    assert record.status is None and record.completed and record.has("plan") and not record.has("status")
    assert _text(record.to_dict()) == src.read_text()
    record.save(tmp_path / "run")
    saved = (tmp_path / "run" / RESULTS).read_text()
    again = json.loads(saved)
    assert list(again) == ["sweep_id", *data, "recorded_at"]
    assert _text({"sweep_id": None, **data, "recorded_at": again["recorded_at"]}) == saved
    assert RunRecord.load(tmp_path / "run") == record


def test_a_field_set_after_loading_goes_after_the_keys_read(tmp_path: Path) -> None:
    record = RunRecord.from_dict({"status": "completed", "config": {}})
    record.export_dir = "/x/export"
    record.eval = {"glue": {"score": 0.5}}
    assert list(record.to_dict()) == ["status", "config", "eval", "export_dir"]


def test_accessors() -> None:
    record = RunRecord.from_dict(
        {
            "variant": "hybrid_gralora",
            "status": "failed",
            "config": {"adapter": {"r": 8, "hybrid_r": 8}, "experiment_name": "gralora_code_llama"},
            "eval": {"humaneval": {"pass@1": 0.4, "ok": True, "n": "164"}},
            "callbacks": {"GradientAlignment": {"metrics": {"align/mean/cos_f": {"mean": 0.5}}}},
        }
    )
    assert not record.completed
    assert record.rank == 16 and record.experiment == "gralora_code_llama"
    assert record.eval_metric("humaneval", "pass@1") == 0.4
    assert record.eval_metric("humaneval", "ok") is None and record.eval_metric("humaneval", "n") is None
    assert record.eval_metric("gsm8k", "accuracy") is None
    assert record.at("config", "adapter", "r") == 8 and record.at("config", "nope", "r") is None
    assert record.callback_summary("GradientAlignment")["metrics"]["align/mean/cos_f"]["mean"] == 0.5
    assert record.callback_summary("GIDWarmup") == {}
    assert record.missing(["variant", "model", "seed", "config"]) == ["model", "seed"]
    assert RunRecord.from_dict({"variant": "full", "config": {"adapter": {"r": 8}}}).rank is None


def test_load_refuses_what_is_not_a_record(tmp_path: Path) -> None:
    (tmp_path / RESULTS).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        RunRecord.load(tmp_path)
    (tmp_path / RESULTS).write_text("{")
    with pytest.raises(json.JSONDecodeError):
        RunRecord.load(tmp_path)
    with pytest.raises(OSError):
        RunRecord.load(tmp_path / "absent")


# ------------------------------------------------------------------------------------------------------------------
# the records the training path writes
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir holding the results.json of a real (two-step) training run."""
    run = tmp_path_factory.mktemp("record") / "run"
    train(make_cfg(run, ["trainer.max_steps=2", "trainer.val_check_interval=2", "wandb.mode=disabled"]))
    return run


def test_a_trained_runs_record_loads_and_saves_unchanged(trained: Path, tmp_path: Path) -> None:
    text = (trained / RESULTS).read_text()
    record = RunRecord.load(trained)
    assert record.completed and record.extra == {}  # every key training writes is a field
    assert record.variant == "lora" and record.global_step == 2 and record.has("plan")
    assert _text(record.to_dict()) == text
    record.save(tmp_path)
    saved = json.loads((tmp_path / RESULTS).read_text())
    original = json.loads(text)
    assert list(saved) == list(original)
    assert {**saved, "recorded_at": None} == {**original, "recorded_at": None}
    assert RunRecord.load(tmp_path) == record


def test_an_evaluation_amends_eval_and_keeps_the_rest(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = RunRecord.load(run)
    assert RunRecord.add_eval(run, {"humaneval": {"pass@1": 0.25, "n": 4}})
    # the eval CLI's path: the rehearsal's GSM8K questions (Tom has i apples and buys 2), answers 2 and 4: one right
    data = rehearsal_data(tmp_path, "gsm8k")
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps({"completion": f"The answer is: {a}"}) + "\n" for a in (2, 4, 4, 5)))
    eval_main([f"run_dir={run}", "eval=gsm8k", f"eval.data_files={data}", f"eval.completions={completions}"])
    after = RunRecord.load(run)
    assert after.eval == {"humaneval": {"pass@1": 0.25, "n": 4}, "gsm8k": {"accuracy": 0.75, "n": 4}}
    assert {**after.to_dict(), "eval": None} == {**before.to_dict(), "eval": None}
    assert after.recorded_at == before.recorded_at and not (run / ATTEMPTS).exists()  # an amendment, no new attempt


# ------------------------------------------------------------------------------------------------------------------
# the records of runs that did not complete
# ------------------------------------------------------------------------------------------------------------------
def test_a_failed_runs_record_loads_with_its_status(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["wandb.mode=disabled"])
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        returned = failure_record(cfg, err)
    record = RunRecord.load(tmp_path)
    assert record == returned
    assert record.status == "failed" and not record.completed and record.error == "RuntimeError: boom"
    assert "boom" in record.traceback and record.variant == "lora" and record.identity["hash"]
    assert list(record.to_dict())[:4] == ["sweep_id", "status", "error", "traceback"]
    (attempt,) = (tmp_path / ATTEMPTS).glob("*-failed.json")
    assert RunRecord.load(attempt) == record


def test_diverged_and_interrupted_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StopRequest, "signum", None)  # no signal received: Interrupted reports SIGTERM
    diverged = failure_record(make_cfg(tmp_path / "d", ["wandb.mode=disabled"]), Diverged(7, "loss", float("nan")))
    assert RunRecord.load(tmp_path / "d") == diverged
    assert diverged.status == "diverged" and diverged.diverged_at_step == 7
    stopped = failure_record(make_cfg(tmp_path / "i", ["wandb.mode=disabled"]), Interrupted("fit", 3, None))
    loaded = RunRecord.load(tmp_path / "i")
    assert loaded == stopped and loaded.status == "interrupted"
    assert (loaded.signal, loaded.phase, loaded.global_step, loaded.checkpoint) == ("SIGTERM", "fit", 3, None)
    assert loaded.has("checkpoint") and loaded.resume == "the same command (nothing to resume yet)"
