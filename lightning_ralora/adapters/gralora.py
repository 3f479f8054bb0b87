"""Placeholder: being written."""

from .base import AdapterLayer


class GraLoRALinear(AdapterLayer):
    kind = "gralora"
