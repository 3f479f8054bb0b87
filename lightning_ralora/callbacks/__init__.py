"""Lightning callbacks that schedule adapter maths: GID warm-up, SDS switch/refresh, gradient alignment; and the
divergence guard."""

from .divergence import Diverged, DivergenceGuard
from .gid_warmup import GIDWarmup
from .sds_schedule import SDSSchedule

__all__ = ["DivergenceGuard", "Diverged", "GIDWarmup", "SDSSchedule"]
