"""A small byte-level GPT and its data, for the examples and benchmarks.

Nothing is downloaded: :func:`default_corpus_text` reads the Python standard library's own source
files, found at run time next to the ``os`` module. Tokens are bytes (vocabulary 256), so a batch
``(x, y)`` of shape ``[B, T]`` holds ``B * T`` tokens.

Example::

    import lightning as L
    from tinygpt_model import ByteDataModule, TinyGPT

    L.seed_everything(0)
    dm = ByteDataModule(block_size=128, batch_size=32)
    model = TinyGPT(block_size=128)
    L.Trainer(max_steps=200).fit(model, datamodule=dm)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB_SIZE = 256  # bytes


# ---------------------------------------------------------------- data


def default_corpus_text(max_bytes: int = 2_000_000) -> bytes:
    """Up to ``max_bytes`` of Python source from this interpreter's standard library.

    The ``.py`` files under ``os.path.dirname(os.__file__)`` (``site-packages`` and caches skipped)
    are read in sorted path order and concatenated, so the same Python installation always gives
    the same bytes.

    Raises:
        ValueError: ``max_bytes`` is not a positive integer.
        RuntimeError: no source file could be read (a zipped or stripped standard library).
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"`max_bytes` must be a positive integer, got {max_bytes!r}")
    root = os.path.dirname(os.__file__)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    chunks, total = [], 0
    for path in sorted(paths):
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes - total)
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no readable .py file under {root}: pass the corpus text yourself")
    return b"".join(chunks)


class ByteDataset(Dataset):
    """Windows of ``block_size + 1`` bytes: input ``x = data[i : i+T]``, target ``y = data[i+1 : i+T+1]``.

    Args:
        data: the bytes, as ``bytes`` or a 1-D uint8/long tensor.
        block_size: tokens per sample ``T``.
        stride: distance between window starts; ``block_size`` gives non-overlapping windows.
    """

    def __init__(self, data: bytes | torch.Tensor, block_size: int, stride: int | None = None) -> None:
        if isinstance(data, (bytes, bytearray)):
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.data = data.long()
        self.block_size = block_size
        self.stride = stride or block_size
        if len(self.data) < block_size + 1:
            raise ValueError(f"need at least block_size + 1 = {block_size + 1} bytes, got {len(self.data)}")

    def __len__(self) -> int:
        return (len(self.data) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = idx * self.stride
        chunk = self.data[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class ByteDataModule(LightningDataModule):
    """Byte-level train/val/test splits of a text: contiguous parts, so no window straddles two splits.

    Args:
        text: the corpus bytes (or ``str``, encoded as UTF-8); default :func:`default_corpus_text`.
        text_file: read the corpus from this file instead.
        max_bytes: most bytes of the default corpus (or of ``text_file``) to use.
        block_size: tokens per sample.
        batch_size: samples per batch.
        val_fraction: share of the bytes for validation (the part after the training part).
        test_fraction: share of the bytes for testing (the end of the corpus).
        seed: seeds the training shuffle; each new training dataloader iterator continues the same
            seeded sequence, so two runs with the same seed see the same batches.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        text: bytes | str | None = None,
        text_file: str | None = None,
        max_bytes: int = 2_000_000,
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"need 0 < val_fraction, 0 <= test_fraction and a sum < 1, got {val_fraction}, {test_fraction}"
            )
        self.text, self.text_file, self.max_bytes = text, text_file, max_bytes
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.seed, self.num_workers = seed, num_workers
        self._generator: torch.Generator | None = None
        self.train_set: ByteDataset | None = None

    def _corpus(self) -> bytes:
        if self.text_file is not None:
            with open(self.text_file, "rb") as f:
                return f.read(self.max_bytes)
        if self.text is not None:
            return self.text.encode("utf-8") if isinstance(self.text, str) else bytes(self.text)
        return default_corpus_text(self.max_bytes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = torch.frombuffer(bytearray(self._corpus()), dtype=torch.uint8)
        n = len(data)
        n_test = int(n * self.test_fraction)
        n_val = int(n * self.val_fraction)
        n_train = n - n_val - n_test
        self.train_set = ByteDataset(data[:n_train], self.block_size)
        self.val_set = ByteDataset(data[n_train : n_train + n_val], self.block_size)
        self.test_set = ByteDataset(data[n_train + n_val :], self.block_size) if n_test else self.val_set
        self._generator = torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=self._generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)


# ---------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=False),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model, bias=False),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(LightningModule):
    """A decoder-only transformer over bytes (pre-LayerNorm, learned positions, no Linear biases).

    Every Linear layer's ``in_features`` is ``d_model`` or ``4 * d_model``, so any ``group_size``
    dividing ``d_model`` fits int4 per-group quantization. The defaults give about 1.9 M parameters.

    Logged: ``train_loss``, ``val_loss``, ``test_loss`` (cross-entropy, nats per byte).

    Args:
        n_layer: transformer blocks.
        n_head: attention heads (must divide ``d_model``).
        d_model: width.
        block_size: longest context (positions).
        dropout: dropout probability.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay on the 2-D weights.
        warmup_steps: linear learning-rate warm-up.
    """

    def __init__(
        self,
        n_layer: int = 4,
        n_head: int = 6,
        d_model: int = 192,
        block_size: int = 128,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"`n_head` ({n_head}) must divide `d_model` ({d_model})")
        self.save_hyperparameters()
        self.tok_emb = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, 256]`` for byte indices ``[B, T]``."""
        t = idx.shape[1]
        if t > self.hparams.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.hparams.block_size}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def test_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("test_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        if not self.hparams.warmup_steps:
            return optimizer
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.inference_mode()
    def generate(self, prompt: bytes, max_new_tokens: int = 64, temperature: float = 1.0) -> bytes:
        """Sample ``max_new_tokens`` bytes after ``prompt`` (for a quick look at what it learned)."""
        idx = torch.tensor([list(prompt) or [10]], dtype=torch.long, device=self.device)
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.hparams.block_size :])[:, -1] / max(temperature, 1e-6)
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return bytes(idx[0].tolist())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ByteDataModule", "ByteDataset", "TinyGPT", "count_parameters", "default_corpus_text", "VOCAB_SIZE"]
