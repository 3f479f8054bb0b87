"""The shared adapter matrix: one factory per adapter configuration. A new variant adds a case here and
gets every contract check of tests/test_adapter_contract.py for free."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lightning_ralora.adapters import GraLoRALinear, LoRALinear, RaLoRALinear, SDSLoRALinear
from lightning_ralora.adapters.base import AdapterLayer

IN, OUT = 16, 24


@dataclass
class Case:
    name: str
    build: Callable[[nn.Linear], AdapterLayer]
    params_formula: Callable[[int, int], int]  # (m, n) -> trainable count stated by the paper
    prepare: Callable[[AdapterLayer], None] = lambda layer: None  # e.g. SDS switch


def _sds_switched(layer: AdapterLayer) -> None:
    layer.reparameterize()


CASES = [
    Case("lora", lambda b: LoRALinear(b, r=4, alpha=8), lambda m, n: 4 * (m + n)),
    Case("rslora", lambda b: LoRALinear(b, r=4, alpha=8, rslora=True), lambda m, n: 4 * (m + n)),
    Case("ralora_n1", lambda b: RaLoRALinear(b, r=4, n_blocks=1, alpha=8), lambda m, n: 4 * (m + n)),
    Case("ralora_n2", lambda b: RaLoRALinear(b, r=4, n_blocks=2, alpha=8), lambda m, n: 4 * (m + n)),
    Case("ralora_n4", lambda b: RaLoRALinear(b, r=2, n_blocks=4, alpha=8), lambda m, n: 2 * (m + n)),
    Case("gralora_k2", lambda b: GraLoRALinear(b, r=4, k=2, alpha=8), lambda m, n: 4 * (m + n)),
    Case("hybrid_gralora", lambda b: GraLoRALinear(b, r=4, k=2, alpha=8, hybrid_r=2), lambda m, n: 6 * (m + n)),
    Case("sds_warmup", lambda b: SDSLoRALinear(b, r=4, alpha=4), lambda m, n: 4 * (m + n)),
    Case("sds_switched", lambda b: SDSLoRALinear(b, r=4, alpha=4), lambda m, n: 4 * (m + n), _sds_switched),
]
