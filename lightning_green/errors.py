"""The package's exception classes, defined once at module level so they can be caught by type and
pickled (a ``ddp_spawn`` child sends its exception back to the parent)."""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException


class MisconfiguredTrainer(MisconfigurationException, RuntimeError):
    """A Trainer set up in a way a callback or strategy of this package cannot work with: Lightning's
    ``MisconfigurationException``, and also a ``RuntimeError`` (what this package raised before)."""
