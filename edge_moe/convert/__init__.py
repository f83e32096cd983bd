"""Conversion of Hugging Face checkpoints into .emoe files."""

from edge_moe.convert.converter import convert

__all__ = ["convert"]
