"""Placeholder: being written."""

from .base import AdapterLayer


class RaLoRALinear(AdapterLayer):
    kind = "ralora"
