"""FSDP2 (trainer=fsdp2, 2 CPU processes over gloo) against DDP: every variant, its callbacks, sharded checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ralora.cli.consolidate import consolidate
from lightning_ralora.modules.adapter_module import read_plan
from lightning_ralora.run.checkpoints import checkpoint_problem
from lightning_ralora.run.consolidate import load_full_checkpoint
from tests.conftest import run_cli

VARIANTS = ["lora", "rslora", "ralora", "ralora_pro", "ls_lora", "gralora", "hybrid_gralora", "sds_lora"]
# tiny and short: 6 steps, alignment measured on steps 2, 4, 6; SDS switches after step 2 and refreshes after
TINY = ["trainer.max_steps=6", "trainer.val_check_interval=6", "callbacks.checkpoint.every_n_train_steps=3"]
TINY += ["task.train_size=64", "task.val_size=16", "callbacks=alignment", "callbacks.alignment.every_n_steps=2"]


def _overrides(variant: str) -> list[str]:
    extra = ["adapter.warmup_steps=2"] if variant == "sds_lora" else []
    return ["debug=fast", f"adapter={variant}", *TINY, *extra]


def _train(run_dir: Path, *overrides: str) -> dict:
    res = run_cli(run_dir, *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_full_checkpoint(ckpt)["state_dict"].items()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp2_equals_ddp(tmp_path: Path, variant: str) -> None:
    """Same digests on both ranks, the callbacks ran, and the final weights equal a DDP run of the same config."""
    runs = {s: _train(tmp_path / s, f"trainer={s}", *_overrides(variant)) for s in ("fsdp2", "ddp")}
    for results in runs.values():
        assert results["world_size"] == 2
        for key in ("structure_digest_per_rank", "adapter_state_digest_per_rank"):
            assert len(set(results[key])) == 1, key
        assert results["callbacks"]["GradientAlignment"]["logged_steps"] == [2, 4, 6]
    if variant == "sds_lora":
        assert (
            runs["fsdp2"]["callbacks"]["SDSSchedule"]["refresh_log"]
            == runs["ddp"]["callbacks"]["SDSSchedule"]["refresh_log"]
        )
    sharded = tmp_path / "fsdp2" / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()  # a distributed checkpoint
    _assert_close(_state(sharded), _state(tmp_path / "ddp" / "checkpoints" / "last.ckpt"))


RESUME = {
    "sds_lora": ["adapter=sds_lora", "adapter.warmup_steps=2", "adapter.K=2"],
    "ralora": ["adapter=ralora", "adapter.gid_batches=2"],
}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(RESUME))
def test_fsdp2_resumes_from_its_sharded_last_checkpoint(tmp_path: Path, case: str) -> None:
    """A run crashed after step 4 and resumed with ckpt_path=last (a sharded directory: plan, schedule state and
    identity read from its meta.pt) ends as the uninterrupted run: plan, SDS refresh steps, weights."""
    common = ["debug=fast", "trainer=fsdp2", *RESUME[case], "task.train_size=64", "task.val_size=16"]
    common += ["trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks.checkpoint.every_n_train_steps=1"]
    full = _train(tmp_path / "full", *common)
    crash = ["+callbacks.crash._target_=tests.test_exact_resume.CrashAt", "+callbacks.crash.step=4"]
    assert run_cli(tmp_path / "resumed", *common, *crash).returncode != 0
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and load_full_checkpoint(last)["global_step"] == 4
    assert read_plan(last) is not None or case != "ralora"
    resumed = _train(tmp_path / "resumed", *common, "ckpt_path=last", "resume.allow_changes=[callbacks.crash]")
    assert [p.name for p in last.parent.iterdir() if p.name.startswith(".")] == []  # no staged or set-aside copy
    assert resumed["identity"] == full["identity"]
    if case == "ralora":
        assert resumed["plan"]["entries"] == full["plan"]["entries"]
    assert resumed["callbacks"].get("SDSSchedule") == full["callbacks"].get("SDSSchedule")
    _assert_close(_state(last), _state(tmp_path / "full" / "checkpoints" / "last.ckpt"), atol=1e-6)
    one_file = consolidate(last, tmp_path / "consolidated.ckpt")  # the CLI's function: one torch.save file
    assert read_plan(one_file) == read_plan(last)
    _assert_close(_state(one_file), _state(last), atol=0.0)


class KillMidSave(L.Callback):
    """Simulates SLURM killing every rank while the checkpoint of `step` is being written: the shards are on disk,
    Lightning's meta.pt is not yet (each rank exits hard right after writing its shards)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        import lightning.pytorch.strategies.model_parallel as model_parallel

        write_shards = model_parallel._distributed_checkpoint_save

        def write_then_die(*a: object, **kw: object) -> None:
            write_shards(*a, **kw)
            os._exit(9)

        model_parallel._distributed_checkpoint_save = write_then_die


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_killed_mid_save_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    """Killed while writing step 5's sharded last.ckpt (shards written, metadata not): last.ckpt is still step 4's
    whole checkpoint (not step 4's metadata over step 5's shards), the next start removes the staged copy, and the
    resumed run ends with the uninterrupted run's weights."""
    common = ["debug=fast", "trainer=fsdp2", "adapter=lora", "task.train_size=64", "task.val_size=16"]
    common += ["trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks.checkpoint.every_n_train_steps=1"]
    full = _train(tmp_path / "full", *common)
    kill = ["+callbacks.kill._target_=tests.test_fsdp2.KillMidSave", "+callbacks.kill.step=5"]
    assert run_cli(tmp_path / "resumed", *common, *kill).returncode != 0
    folder = tmp_path / "resumed" / "checkpoints"
    assert (folder / ".last.ckpt.partial").is_dir()  # the killed save, never renamed in
    assert checkpoint_problem(folder / "last.ckpt") is None
    assert load_full_checkpoint(folder / "last.ckpt")["global_step"] == 4
    state_at_4 = _state(folder / "last.ckpt")
    res = run_cli(tmp_path / "resumed", *common, "ckpt_path=last", "resume.allow_changes=[callbacks.kill]")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "removed" in res.stderr and ".last.ckpt.partial" in res.stderr
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert resumed["identity"] == full["identity"]
    _assert_close(_state(folder / "last.ckpt"), _state(tmp_path / "full" / "checkpoints" / "last.ckpt"), atol=1e-6)
    assert max((state_at_4[k] - _state(folder / "last.ckpt")[k]).abs().max().item() for k in state_at_4) > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("trainer", ["fsdp2", "hsdp"])
def test_two_simulated_nodes_train_with_world_size_two(tmp_path: Path, trainer: str) -> None:
    """Two torchrun 'nodes' of one process each on 127.0.0.1: the mesh spans the world (not trainer.devices);
    hsdp: replicate across the nodes, shard within one (a 2 x 1 mesh)."""
    import os
    import subprocess
    import sys

    port = _free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    launch += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    args = ["-m", "lightning_ralora.cli.train", f"hydra.run.dir={tmp_path}", "debug=fast", f"trainer={trainer}"]
    args += ["trainer.num_nodes=2", "trainer.devices=1", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    nodes = [
        subprocess.Popen(
            [*launch, f"--node-rank={n}", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for n in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs[0][-3000:] + outs[1][-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    assert len(set(results["adapter_state_digest_per_rank"])) == 1


def _hub(tmp_path: Path, sft_file: Path, *model: str) -> tuple[Path, list[str]]:
    """A tiny backbone (`model` overrides) written with save_pretrained (a hub directory) and the overrides of an
    FSDP2 SFT run on it."""
    from lightning_ralora.data.tokenizer import byte_tokenizer
    from lightning_ralora.modules.adapter_module import AdapterModule
    from tests.conftest import make_cfg

    cfg = make_cfg(tmp_path, list(model))
    hub = tmp_path / "hub"
    AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim).backbone.save_pretrained(hub)
    byte_tokenizer().save_pretrained(hub)
    common = ["debug=fast", "trainer=fsdp2", "task=sft", f"task.data_files={sft_file}", f"model.pretrained={hub}"]
    return hub, [*common, f"model.tokenizer={hub}", "model.config=null"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_load_on_rank0_keeps_other_ranks_free_of_the_pretrained_weights(tmp_path: Path, sft_file: Path) -> None:
    """model.load_on_rank0: rank 1 builds a meta skeleton (0 bytes loaded) and receives its shards from rank 0
    after fully_shard; training ends as with every rank loading the hub directory (save_pretrained format)."""
    hub, common = _hub(tmp_path, sft_file)
    common += ["trainer.max_steps=4", "trainer.val_check_interval=4"]
    every = _train(tmp_path / "every", *common)
    rank0 = _train(tmp_path / "rank0", *common, "+model.load_on_rank0=true")
    full_bytes = sum(f.stat().st_size for f in hub.glob("*.safetensors"))
    loaded = {
        run: json.loads((tmp_path / run / "load_bytes.json").read_text())["loaded_bytes_per_rank"]
        for run in ("every", "rank0")
    }
    assert loaded["rank0"][1] == 0 and loaded["rank0"][0] == loaded["every"][1] > 0.9 * full_bytes
    assert rank0["adapter_state_digest_per_rank"] == every["adapter_state_digest_per_rank"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_mixed_precision_and_activation_checkpointing_train(tmp_path: Path) -> None:
    """bf16 parameters with fp32 gradient reduction, blocks recomputed in backward: the run trains, ranks agree."""
    opts = ["strategy.param_dtype=bfloat16", "strategy.reduce_dtype=float32", "strategy.activation_checkpointing=true"]
    results = _train(tmp_path, "debug=fast", "trainer=fsdp2", *[f"trainer.{o}" for o in opts], "trainer.max_steps=4")
    assert len(set(results["adapter_state_digest_per_rank"])) == 1
    assert results["final_metrics"]["val/loss"] == results["final_metrics"]["val/loss"]  # not NaN


def _sharded_keys(ckpt_dir: Path) -> set[str]:
    """The model tensor keys a distributed checkpoint directory holds (from its DCP metadata, nothing loaded)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    return {k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")}


HUB_ADAPTERS = {"lora": ["adapter=lora"], "sds_lora": ["adapter=sds_lora", "adapter.warmup_steps=2", "adapter.K=2"]}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", list(HUB_ADAPTERS))
def test_fsdp2_pretrained_backbone_writes_an_adapter_only_sharded_checkpoint(
    tmp_path: Path, sft_file: Path, variant: str
) -> None:
    """On a hub backbone the sharded checkpoint holds exactly the module's tensors that are not hub weights
    (adapters and their buffers, SDS's Q's), is much smaller than the hub weights, and consolidates to the same keys."""
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    from lightning_ralora.modules.adapter_module import AdapterModule
    from tests.conftest import make_cfg

    hub, common = _hub(tmp_path, sft_file, "model.config.hidden_size=256", "model.config.intermediate_size=512")
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.checkpoint.every_n_train_steps=4"]
    _train(tmp_path / "run", *common, *HUB_ADAPTERS[variant], *steps)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    # reference: the adapted module built in this process, minus every tensor the hub model has
    cfg = make_cfg(tmp_path / "ref", [*common, *HUB_ADAPTERS[variant]])
    module = AdapterModule(cfg.model, cfg.task, cfg.adapter, cfg.optim)
    module.configure_model()
    hub_keys = set(AutoModelForCausalLM.from_pretrained(hub).state_dict())
    expected = {k for k in module.state_dict() if k.removeprefix("backbone.").replace(".base.", ".") not in hub_keys}
    assert _sharded_keys(last) == expected
    trainable = {f"backbone.{n}" for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trainable and trainable <= expected
    if variant == "sds_lora":  # the buffers: Q's and the switch flag
        assert {k.rsplit(".", 1)[1] for k in expected - trainable} == {"Q_A", "Q_B", "switched"}
    hub_bytes = sum(f.stat().st_size for f in hub.glob("*.safetensors"))
    stored = FileSystemReader(str(last)).read_metadata().storage_data  # bytes each tensor takes in the shard files
    assert sum(i.length for k, i in stored.items() if k.fqn.startswith("state_dict.")) < 0.15 * hub_bytes
    assert sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) < 0.35 * hub_bytes  # with optimizer state
    assert set(_state(consolidate(last, tmp_path / "one.ckpt"))) == expected


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_pretrained_backbone_resumes_from_its_adapter_only_sharded_checkpoint(
    tmp_path: Path, sft_file: Path
) -> None:
    """SDS-LoRA on a hub backbone, crashed after step 3 and resumed from its adapter-only sharded last checkpoint
    (base from the hub; adapters, Q's, optimizer from the checkpoint), ends as the uninterrupted run."""
    _, common = _hub(tmp_path, sft_file)
    common += [*HUB_ADAPTERS["sds_lora"], "trainer.max_steps=6", "trainer.val_check_interval=6"]
    common += ["callbacks.checkpoint.every_n_train_steps=1"]
    full = _train(tmp_path / "full", *common)
    crash = ["+callbacks.crash._target_=tests.test_exact_resume.CrashAt", "+callbacks.crash.step=3"]
    assert run_cli(tmp_path / "resumed", *common, *crash).returncode != 0
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and load_full_checkpoint(last)["global_step"] == 3
    resumed = _train(tmp_path / "resumed", *common, "ckpt_path=last", "resume.allow_changes=[callbacks.crash]")
    assert full["callbacks"]["SDSSchedule"]["refresh_log"]
    assert resumed["callbacks"]["SDSSchedule"] == full["callbacks"]["SDSSchedule"]
    _assert_close(_state(last), _state(tmp_path / "full" / "checkpoints" / "last.ckpt"), atol=1e-6)
    val = {run["final_metrics"]["val/loss"] for run in (full, resumed)}  # the base too: the loss of the whole model
    assert max(val) - min(val) <= 1e-5


# a sitecustomize for the export test: an audit hook logging per rank what is opened for writing or created under
# AUDIT_WRITES_UNDER (save_pretrained always creates its directory and writes config.json from Python)
AUDIT_WRITES = """
import os, sys

def _hook(event, args, _under=os.environ["AUDIT_WRITES_UNDER"], _log=os.environ["AUDIT_WRITES_LOG"]):
    if event not in ("open", "os.mkdir", "os.rename", "os.replace") or not isinstance(args[0], (str, os.PathLike)):
        return
    if event == "open" and not (
        (isinstance(args[1], str) and set(args[1]) & set("wax+"))
        or (args[1] is None and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    ):
        return
    if os.path.abspath(os.fspath(args[0])).startswith(_under):
        with open(f"{_log}.rank{os.environ.get('LOCAL_RANK', '0')}", "a") as f:
            f.write(f"{event} {os.fspath(args[0])}\\n")

sys.addaudithook(_hook)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_export_of_a_pretrained_backbone_equals_ddp_and_the_dense_merge(tmp_path: Path, sft_file: Path) -> None:
    """export=true under FSDP2 (every rank gathers, rank 0 alone writes): the save_pretrained model loads with
    transformers, its weights are hub W + s·B A from the consolidated checkpoint, its logits equal DDP's export."""
    import os

    from transformers import AutoModelForCausalLM

    hub, common = _hub(tmp_path, sft_file)
    common += ["adapter=lora", "export=true", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    common += ["callbacks.checkpoint.every_n_train_steps=4"]
    site = tmp_path / "audit"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_WRITES)
    log = site / "writes"  # <log>.rank<r>: what rank r opened for writing (or created) in the run directory
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    env |= {"AUDIT_WRITES_UNDER": str(tmp_path / "fsdp2"), "AUDIT_WRITES_LOG": str(log)}
    res = run_cli(tmp_path / "fsdp2", *common, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "fsdp2" / "results.json").read_text())["world_size"] == 2
    writes = [Path(f"{log}.rank{r}").read_text() for r in (0, 1)]  # rank 1 audited: it writes its own log file
    export = str(tmp_path / "fsdp2" / "export")
    assert f"{export}/config.json" in writes[0] and writes[1] and export not in writes[1]
    _train(tmp_path / "ddp", *common, "trainer=ddp")
    assert sorted(os.listdir(export)) == sorted(os.listdir(tmp_path / "ddp" / "export"))

    # reference: the hub weights plus s·B A of every adapted layer, factors read from the consolidated checkpoint
    ckpt = load_full_checkpoint(consolidate(tmp_path / "fsdp2" / "checkpoints" / "last.ckpt", tmp_path / "one.ckpt"))
    adapter = ckpt["hyper_parameters"]["adapter_cfg"]
    assert not adapter["rslora"] and adapter["scale"] is None
    scale = adapter["alpha"] / adapter["r"]
    reference = AutoModelForCausalLM.from_pretrained(hub)
    weights = reference.state_dict()
    factors = {k.removeprefix("backbone.").removesuffix(".lora_A") for k in ckpt["state_dict"] if k.endswith("lora_A")}
    assert len(factors) == 2 * 7  # two blocks, seven target linears each
    for name in factors:
        a, b = (ckpt["state_dict"][f"backbone.{name}.lora_{s}"].double() for s in "AB")
        weights[f"{name}.weight"] = (weights[f"{name}.weight"].double() + scale * b @ a).float()
    reference.load_state_dict(weights)
    exported = {s: AutoModelForCausalLM.from_pretrained(tmp_path / s / "export") for s in ("fsdp2", "ddp")}
    _assert_close(dict(exported["fsdp2"].state_dict()), dict(reference.state_dict()), atol=1e-6)
    batch = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {s: m.eval()(batch).logits for s, m in {**exported, "reference": reference.eval()}.items()}
    assert (logits["fsdp2"] - logits["ddp"]).abs().max().item() <= 1e-5
    assert (logits["fsdp2"] - logits["reference"]).abs().max().item() <= 1e-5
    assert (logits["fsdp2"] - AutoModelForCausalLM.from_pretrained(hub)(batch).logits).abs().max().item() > 1e-4
