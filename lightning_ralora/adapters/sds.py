"""Placeholder: being written."""

from .base import AdapterLayer


class SDSLoRALinear(AdapterLayer):
    kind = "sds"
