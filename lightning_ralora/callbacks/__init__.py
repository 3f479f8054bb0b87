"""Lightning callbacks that schedule adapter maths: GID warm-up, SDS switch/refresh, gradient alignment."""

from .gid_warmup import GIDWarmup
from .sds_schedule import SDSSchedule

__all__ = ["GIDWarmup", "SDSSchedule"]
