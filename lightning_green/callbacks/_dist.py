"""Moved to :mod:`lightning_green.distributed`; kept until ``quantization/qat.py`` imports from there."""

from lightning_green.distributed import distributed, gather_objects, reduce_sum

__all__ = ["distributed", "gather_objects", "reduce_sum"]
