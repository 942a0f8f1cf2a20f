"""``litgpt pretrain`` with its own command line, run by tests/test_litgpt.py in a process of its own.

``python litgpt_pretrain.py pretrain --config CONFIG.yaml`` is ``litgpt pretrain --config CONFIG.yaml``:
the same ``litgpt.__main__.main()``. Two things are added around it, neither touching what LitGPT runs:

- :class:`TinyTextFiles`, a ``litgpt.data.DataModule`` over local ``.txt`` files. LitGPT's own
  ``TextFiles`` tokenizes through ``litdata.optimize``, and ``litdata`` is no dependency of LitGPT or of
  this project (it is not installed here), so the config names this one instead.
- Where the installed metadata of ``lightning_green`` predates its entry points (an editable install
  made before ``pyproject.toml`` declared them), Lightning's loader is handed the entry points that
  ``pyproject.toml`` declares, as ``pip install -e .`` would register them.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lightning.fabric.utilities.registry as registry
import tomllib
import torch
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GROUPS = ("lightning.pytorch.callbacks_factory", "lightning.fabric.callbacks_factory")


@dataclass
class TinyTextFiles(DataModule):
    """Every ``.txt`` file of ``train_data_path`` tokenized, cut into blocks of ``max_seq_length + 1``
    tokens; the last file is the validation set."""

    train_data_path: Path
    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()

    def connect(self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int = -1) -> None:
        self.tokenizer, self.batch_size, self.max_seq_length = tokenizer, batch_size, max_seq_length + 1

    def _blocks(self, paths: list[str]) -> list[torch.Tensor]:
        ids = torch.cat([self.tokenizer.encode(Path(p).read_text(), eos=True) for p in paths])
        n = len(ids) // self.max_seq_length
        return list(ids[: n * self.max_seq_length].view(n, self.max_seq_length))

    def train_dataloader(self) -> DataLoader:
        *train, _ = sorted(glob.glob(str(Path(self.train_data_path) / "*.txt")))
        return DataLoader(self._blocks(train), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        *_, val = sorted(glob.glob(str(Path(self.train_data_path) / "*.txt")))
        return DataLoader(self._blocks([val]), batch_size=self.batch_size)


def declare_entry_points() -> None:
    """Hand Lightning's loader the entry points of pyproject.toml when the installed metadata lacks them."""
    if any(e.value.startswith("lightning_green") for e in importlib.metadata.entry_points(group=GROUPS[1])):
        return
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tables = tomllib.load(f)["project"]["entry-points"]
    declared = {g: [importlib.metadata.EntryPoint(n, v, g) for n, v in tables[g].items()] for g in GROUPS}
    registry.entry_points = lambda group=None: declared.get(group, [])


if __name__ == "__main__":
    declare_entry_points()
    from litgpt.__main__ import main

    sys.argv[0] = "litgpt"
    main()
