"""Lightning callbacks that schedule adapter maths: GID warm-up, SDS switch/refresh, gradient alignment; and the
divergence guard."""

from lightning_ralora.callbacks.divergence import Diverged, DivergenceGuard
from lightning_ralora.callbacks.gid_warmup import GIDWarmup
from lightning_ralora.callbacks.sds_schedule import SDSSchedule

__all__ = ["DivergenceGuard", "Diverged", "GIDWarmup", "SDSSchedule"]
