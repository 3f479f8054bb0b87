"""SDS-LoRA (docs/maths.md §6): closed-form gradients, the switch, QR refresh, the schedule and the Lightning
callback."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ralora.adapters import LayerSpec, SDSLoRALinear, adapter_layers, inject
from lightning_ralora.adapters.sds import refresh_due, refresh_steps
from lightning_ralora.callbacks.sds_schedule import SDSSchedule, optimizer_state_is_empty
from tests.helpers import mlp

IN, OUT, R = 12, 10, 3


def _layer(seed: int = 0, r: int = R, alpha: float = 4.0, dtype: torch.dtype = torch.float64) -> SDSLoRALinear:
    """An SDS layer with random (non-zero) warm-up factors."""
    torch.manual_seed(seed)
    layer = SDSLoRALinear(nn.Linear(IN, OUT).to(dtype), r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn_like(layer.lora_A))
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    return layer


def _dense_grad(layer: SDSLoRALinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G = ∂L/∂W of the *dense* weight W0 + ΔW (what full fine-tuning sees), by autograd on a plain matmul."""
    w = (layer.base.weight + layer.delta_weight()).detach().requires_grad_(True)
    loss = (torch.tanh(x @ w.T + layer.base.bias) - y).pow(2).sum()
    (g,) = torch.autograd.grad(loss, w)
    return g


def _factor_grads_autograd(layer: SDSLoRALinear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    layer.zero_grad()
    (torch.tanh(layer(x)) - y).pow(2).sum().backward()
    return layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


# --- gradients ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("switched", [False, True], ids=["warmup", "sds"])
def test_factor_gradients_match_closed_form(switched: bool) -> None:
    layer = _layer()
    if switched:
        layer.reparameterize()
        with torch.no_grad():  # move the factors off the switch point, so B, A and the Q's all differ
            layer.lora_A.add_(0.3 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.3 * torch.randn_like(layer.lora_B))
    x, y = torch.randn(9, IN, dtype=torch.float64), torch.randn(9, OUT, dtype=torch.float64)
    g = _dense_grad(layer, x, y)
    grad_a, grad_b = _factor_grads_autograd(layer, x, y)
    s = layer.scaling
    if switched:
        exp_a, exp_b = s * layer.Q_B.T @ g, s * g @ layer.Q_A  # docs/maths.md §6: singular values of A, B do not enter
    else:
        exp_a, exp_b = s * layer.lora_B.detach().T @ g, s * g @ layer.lora_A.detach().T  # LoRA
    torch.testing.assert_close(grad_a, exp_a, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad_b, exp_b, rtol=1e-9, atol=1e-10)
    closed_a, closed_b = layer.factor_grads(g)
    torch.testing.assert_close(closed_a, exp_a.detach())
    torch.testing.assert_close(closed_b, exp_b.detach())
    assert layer.Q_A.grad is None and not layer.Q_A.requires_grad  # Q's are constants in backward


@pytest.mark.parametrize("x_needs_grad", [True, False], ids=["inner-layer", "first-layer"])
def test_switched_update_is_one_autograd_node_and_equals_the_dense_formula(x_needs_grad: bool) -> None:
    """After the switch a 2-D input runs through `_SDSUpdate` (one node, one rank-2r product): output and the
    gradients of x, A and B equal autograd through the dense weight W0 + s(B Q_Aᵀ + Q_B A); an input that needs no
    gradient (a first layer over frozen embeddings) gets none."""
    layer = _layer()
    layer.reparameterize()
    with torch.no_grad():
        layer.lora_A.add_(0.3 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.3 * torch.randn_like(layer.lora_B))
    x = torch.randn(9, IN, dtype=torch.float64, requires_grad=x_needs_grad)
    g = torch.randn(9, OUT, dtype=torch.float64)
    y = layer(x)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_SDSUpdateBackward"  # under forward's final view
    wanted = [x] if x_needs_grad else []
    got = torch.autograd.grad(y, [*wanted, layer.lora_A, layer.lora_B], g)
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_(x_needs_grad)
    w = layer.base.weight + layer.scaling * (b @ layer.Q_A.T + layer.Q_B @ a)
    y_ref = x_ref @ w.T + layer.base.bias
    want = torch.autograd.grad(y_ref, [x_ref] * x_needs_grad + [a, b], g)
    torch.testing.assert_close(y, y_ref)
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t)


def test_effective_gradient_is_jvp_of_the_factor_gradients() -> None:
    """Ĝ = J Jᵀ G: the first-order change of ΔW along (∂L/∂A, ∂L/∂B), checked with torch.func.jvp."""
    layer = _layer()
    layer.reparameterize()
    g = torch.randn(OUT, IN, dtype=torch.float64)
    grad_a, grad_b = layer.factor_grads(g)
    params = {"lora_A": layer.lora_A.detach(), "lora_B": layer.lora_B.detach()}

    def delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return layer.scaling * (b @ layer.Q_A.T + layer.Q_B @ a)

    _, jvp = torch.func.jvp(delta, (params["lora_A"], params["lora_B"]), (grad_a, grad_b))
    torch.testing.assert_close(layer.effective_gradient(g), jvp)
    s2 = layer.scaling**2
    torch.testing.assert_close(jvp, s2 * (layer.Q_B @ layer.Q_B.T @ g + g @ layer.Q_A @ layer.Q_A.T))


# --- the switch ------------------------------------------------------------------------------------
def test_reparameterize_keeps_output_and_matches_dense_svd() -> None:
    layer = _layer(dtype=torch.float32)
    x = torch.randn(7, IN)
    before, dw_before = layer(x).detach(), layer.delta_weight().detach()
    assert not layer.is_switched and layer.equivalent_rank == R
    layer.reparameterize()
    assert layer.is_switched and bool(layer.switched) and layer.equivalent_rank == min(2 * R, IN, OUT)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), dw_before, rtol=1e-5, atol=1e-5)
    eye = torch.eye(R)
    torch.testing.assert_close(layer.Q_A.T @ layer.Q_A, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.Q_B.T @ layer.Q_B, eye, rtol=0, atol=1e-5)
    # independent reference: the dense SVD of s·B A
    u, sigma, vh = torch.linalg.svd(dw_before.double())
    u, sigma, v = u[:, :R], sigma[:R], vh[:R].T
    torch.testing.assert_close(layer.Q_B.double() @ layer.Q_B.double().T, u @ u.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.Q_A.double() @ layer.Q_A.double().T, v @ v.T, rtol=0, atol=1e-5)
    s = layer.scaling
    torch.testing.assert_close(layer.lora_B.norm(dim=0).double(), sigma / (2 * s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.norm(dim=1).double(), sigma / (2 * s), rtol=1e-5, atol=1e-6)
    # B = Q_B Σ/(2s) and A = Σ Q_Aᵀ/(2s): both factors carry the same singular values
    torch.testing.assert_close(layer.lora_B, layer.Q_B * (layer.lora_B.norm(dim=0)), rtol=1e-5, atol=1e-6)
    # sign convention: the largest-|.| entry of each column of Q_B is positive
    idx = layer.Q_B.abs().argmax(dim=0)
    assert (layer.Q_B.gather(0, idx[None]) > 0).all()


def test_reparameterize_depends_only_on_delta_w() -> None:
    """Deterministic convention: B D, D⁻¹A (same ΔW) give bit-close factors, so every DDP rank agrees."""
    first = _layer()
    second = copy.deepcopy(first)
    d = torch.diag(torch.tensor([2.0, -0.5, 3.0], dtype=torch.float64))
    with torch.no_grad():
        second.lora_B.copy_(second.lora_B @ d)
        second.lora_A.copy_(torch.linalg.inv(d) @ second.lora_A)
    first.reparameterize()
    second.reparameterize()
    for name in ("lora_A", "lora_B", "Q_A", "Q_B"):
        torch.testing.assert_close(getattr(first, name), getattr(second, name), rtol=1e-9, atol=1e-10)
    twin = _layer()
    twin.reparameterize()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), twin.state_dict().values(), strict=True))


def test_reparameterize_twice_and_refresh_before_switch_raise() -> None:
    layer = _layer()
    with pytest.raises(RuntimeError, match="before reparameterize"):
        layer.refresh()
    layer.reparameterize()
    with pytest.raises(RuntimeError, match="called twice"):
        layer.reparameterize()


def test_rank_larger_than_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"adapter.r=11 must be <= min\(in_features, out_features\)=10"):
        SDSLoRALinear(nn.Linear(IN, OUT), r=11, alpha=4)


def test_switched_phase_survives_state_dict_in_a_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 4))
    layer = inject(model, ["0"], LayerSpec(kind="sds", r=R, alpha=4))["0"]
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.reparameterize()
    assert "0.switched" in model.state_dict() and "0.Q_A" in model.state_dict()
    fresh = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 4))
    fresh_layer = inject(fresh, ["0"], LayerSpec(kind="sds", r=R, alpha=4))["0"]
    assert not fresh_layer.is_switched
    fresh.load_state_dict(model.state_dict())
    assert fresh_layer.is_switched
    x = torch.randn(5, IN)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# --- refresh ---------------------------------------------------------------------------------------
def test_refresh_right_after_switch_changes_nothing() -> None:
    layer = _layer()
    layer.reparameterize()
    q_a, q_b = layer.Q_A.clone(), layer.Q_B.clone()
    assert layer.refresh() < 1e-12
    torch.testing.assert_close(layer.Q_A, q_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.Q_B, q_b, rtol=0, atol=1e-12)


def test_refresh_gives_orthonormal_positive_r_bases_and_reports_the_jump() -> None:
    layer = _layer()
    layer.reparameterize()
    with torch.no_grad():
        layer.lora_A.add_(0.5 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.5 * torch.randn_like(layer.lora_B))
    ids = (id(layer.Q_A), id(layer.Q_B), id(layer.lora_A), id(layer.lora_B))
    dw_before = layer.delta_weight().detach().clone()
    jump = layer.refresh()
    assert ids == (id(layer.Q_A), id(layer.Q_B), id(layer.lora_A), id(layer.lora_B))  # in place
    eye = torch.eye(R, dtype=torch.float64)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    for q, m in ((layer.Q_A, a.T), (layer.Q_B, b)):
        torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
        r_factor = q.T @ m  # m = Q R, so R = Qᵀ m: upper triangular with a positive diagonal
        torch.testing.assert_close(torch.tril(r_factor, -1), torch.zeros_like(r_factor), rtol=0, atol=1e-12)
        assert (torch.diagonal(r_factor) > 0).all()
        torch.testing.assert_close(q @ r_factor, m, rtol=0, atol=1e-12)
    dw_after = layer.delta_weight().detach()
    expected = (dw_after - dw_before).norm() / dw_before.norm()
    assert jump > 1e-3
    assert math.isclose(jump, expected.item(), rel_tol=1e-9)


# --- schedule --------------------------------------------------------------------------------------
def test_refresh_share_is_harmonic_over_k() -> None:
    T, K = 1000, 5
    share = sum(refresh_due(t, T, K) for t in range(T)) / T
    harmonic = sum(1 / i for i in range(1, K + 1)) / K
    assert abs(share - 0.457) < 0.005
    assert abs(share - harmonic) < 0.005
    # phase i (0-based) refreshes every (i+1)-th step
    assert [t for t in range(0, 200) if refresh_due(t, T, K)] == list(range(0, 200))
    assert [t for t in range(800, 1000) if refresh_due(t, T, K)] == list(range(800, 1000, 5))


def test_refresh_steps_window() -> None:
    assert refresh_steps(30, 5, warmup_steps=10) == [12, 15, 20, 25]  # t = 30 = T is left out
    assert refresh_steps(30, 5) == [t for t in range(1, 30) if refresh_due(t, 30, 5)]
    with pytest.raises(ValueError, match="total_steps > 0"):
        refresh_due(3, 0, 5)


# --- the Lightning callback ------------------------------------------------------------------------
class MemoryLogger(Logger):
    """Keeps every logged metric with its step."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def steps_of(self, key: str) -> list[int]:
        return [step for step, metrics in self.records if key in metrics]


class TinyModule(L.LightningModule):
    """Two SDS layers in a small MLP regression."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(8, 16, 4)
        inject(self.net, ["0", "2"], LayerSpec(kind="sds", r=2, alpha=4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-2)


class Probe(L.Callback):
    """Records, after each optimizer step (it runs after SDSSchedule), the phase and the optimizer state."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = list(adapter_layers(pl_module).values())
        params = [p for layer in layers for p in layer.adapter_parameters()]
        self.rows[trainer.global_step] = {
            "switched": [layer.is_switched for layer in layers],
            "state_empty": optimizer_state_is_empty(trainer.optimizers, params),
        }


def _data(n_batches: int = 5, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n_batches * batch, 8, generator=g)
    y = torch.sin(x[:, :4]) + 0.1 * torch.randn(n_batches * batch, 4, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


@pytest.fixture
def lightning_env(monkeypatch):
    """Restore the global switches Trainer(deterministic=True) and seed_everything flip."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)
    os.environ.pop("PL_GLOBAL_SEED", None)


def _fit(tmp_path, max_steps: int = 30, ckpt_path: str | None = None, extra: list | None = None, **trainer_kw):
    L.seed_everything(0, verbose=False)
    module = TinyModule()
    schedule, probe, logger = SDSSchedule(warmup_steps=trainer_kw.pop("warmup_steps", 10), K=5), Probe(), MemoryLogger()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=logger,
        log_every_n_steps=50,
        callbacks=[schedule, probe, *(extra or [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(extra),
        default_root_dir=tmp_path,
        **trainer_kw,
    )
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return module, schedule, probe, logger


def test_callback_switches_at_warmup_and_refreshes_on_schedule(tmp_path, lightning_env) -> None:
    module, schedule, probe, logger = _fit(tmp_path)
    assert schedule.switch_step == 10
    assert all(not any(probe.rows[t]["switched"]) for t in range(1, 10))
    assert all(all(probe.rows[t]["switched"]) for t in range(10, 31))
    # the switch reset the optimizer state of every SDS parameter; steps before and after have state
    assert probe.rows[10]["state_empty"]
    assert not probe.rows[9]["state_empty"] and not probe.rows[11]["state_empty"]
    expected = [t for t in range(11, 30) if refresh_due(t, 30, 5)]
    assert schedule.refresh_log == expected == [12, 15, 20, 25]
    assert len(schedule.jump_log) == len(expected) and all(j > 0 for j in schedule.jump_log)
    # the logger sees each refresh once, on its step (Lightning labels step t's metrics t - 1), even though
    # log_every_n_steps=50 would drop every one of them if they went through pl_module.log
    events = [(s + 1, m) for s, m in logger.records if "sds/refresh_jump" in m]
    assert [t for t, _ in events] == expected
    assert [m["sds/refreshes"] for _, m in events] == [1.0, 2.0, 3.0, 4.0]
    assert [m["sds/refresh_jump"] for _, m in events] == pytest.approx(schedule.jump_log)


def test_callback_with_gradient_accumulation_counts_optimizer_steps(tmp_path, lightning_env) -> None:
    _, schedule, probe, _ = _fit(tmp_path, max_steps=20, accumulate_grad_batches=2, warmup_steps=4)
    assert schedule.switch_step == 4
    assert probe.rows[4]["state_empty"] and not probe.rows[3]["state_empty"]
    assert schedule.refresh_log == refresh_steps(20, 5, warmup_steps=4) == [6, 9, 12]


def test_resume_mid_run_matches_uninterrupted_run(tmp_path, lightning_env) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=15, save_top_k=-1, filename="{step}")
    full, full_schedule, _, _ = _fit(tmp_path / "full", extra=[ckpt])
    path = tmp_path / "ckpt" / "step=15.ckpt"
    assert path.exists()
    saved = torch.load(path, weights_only=False)
    assert saved["callbacks"]["SDSSchedule"]["refresh_log"] == [12, 15]  # the step-15 refresh is in the checkpoint
    resumed, resumed_schedule, probe, _ = _fit(tmp_path / "resumed", ckpt_path=str(path))
    assert min(probe.rows) == 16  # really resumed
    assert resumed_schedule.refresh_log == full_schedule.refresh_log == [12, 15, 20, 25]
    assert resumed_schedule.jump_log == pytest.approx(full_schedule.jump_log, rel=1e-6)
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=1e-7, msg=key)


def test_callback_with_zero_warmup_switches_before_the_first_step(tmp_path, lightning_env) -> None:
    _, schedule, probe, _ = _fit(tmp_path, max_steps=3, warmup_steps=0)
    assert schedule.switch_step == 0
    assert all(all(row["switched"]) for row in probe.rows.values())


def test_callback_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError) as err:
        SDSSchedule(warmup_steps=-1, K=0)
    assert "adapter.warmup_steps must be a non-negative integer, got -1" in str(err.value)
    assert "adapter.K must be a positive integer, got 0" in str(err.value)
