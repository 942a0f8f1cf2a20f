"""Prune a small LitGPT model while it trains, and see what the smaller model saves.

A LLaMA-style LitGPT ``GPT`` (gated MLP, 8 heads in 4 query groups) learns bytes of the Python
standard library's source. ``StructuredPruning`` removes 30 % of the MLP hidden units and of the
query groups in 3 events during training; the layers get smaller and training goes on. Then:
parameters and FLOPs per token before and after, validation loss, a few tokens generated with the
KV cache, and the final checkpoint loaded into a fresh, unpruned model by a fresh Trainer.

    python examples/prune.py                  # about a minute on a 2-core CPU
    python examples/prune.py --mode depth     # remove 1 of the 4 blocks instead
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tinygpt_model import VOCAB_SIZE, ByteDataModule  # noqa: E402

from lightning_green import PowerSampler, StructuredPruning  # noqa: E402


class LlamaLM(L.LightningModule):
    def __init__(self, n_layer: int = 4, n_embd: int = 128, block_size: int = 64, lr: float = 2e-3):
        super().__init__()
        from litgpt.model import GPT, Config

        config = Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=8,
            n_query_groups=4,
            block_size=block_size,
            vocab_size=VOCAB_SIZE,
            padded_vocab_size=VOCAB_SIZE,
            intermediate_size=4 * n_embd,
            bias=False,
            parallel_residual=False,
            rotary_percentage=1.0,
            mlp_class_name="LLaMAMLP",
            norm_class_name="RMSNorm",
        )
        self.gpt, self.lr = GPT(config), lr

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.gpt(idx, input_pos=input_pos)

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@torch.inference_mode()
def generate(model: LlamaLM, prompt: bytes, new_tokens: int) -> bytes:
    model.eval()
    idx = torch.tensor([list(prompt)])
    model.gpt.set_kv_cache(batch_size=1, max_seq_length=len(prompt) + new_tokens)
    logits = model(idx, input_pos=torch.arange(len(prompt)))
    out = []
    for i in range(new_tokens):
        token = logits[:, -1:].argmax(-1)
        out.append(int(token))
        logits = model(token, input_pos=torch.tensor([len(prompt) + i]))
    model.gpt.clear_kv_cache()
    return bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mode", choices=["width", "depth"], default="width")
    parser.add_argument("--amount", type=float, default=0.3)
    parser.add_argument("--max-bytes", type=int, default=400_000)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    dm = ByteDataModule(max_bytes=args.max_bytes, block_size=64, batch_size=16)
    start, end = args.steps // 4, args.steps // 2
    schedule = dict(amount=args.amount, start_step=start, end_step=end, events=3, mode=args.mode)
    pruning = StructuredPruning(**schedule)
    trainer = L.Trainer(
        max_steps=args.steps,
        val_check_interval=max(1, args.steps // 3),
        limit_val_batches=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[PowerSampler(print_summary=False), pruning],
    )
    model = LlamaLM()
    trainer.fit(model, datamodule=dm)

    report = pruning.report
    before, config = pruning.pruner.params_before, model.gpt.config
    print(f"\n=== prune ({args.mode}, amount={args.amount}, events at steps {pruning.steps}) ===")
    print(f"parameters: {before['total']:,} -> {report['params']:,} (x{report['params_ratio']:.3f})")
    print(f"FLOPs/token (matrix products): x{report['flops_ratio']:.3f}")
    print(
        f"config: n_layer={config.n_layer} n_head={config.n_head} n_query_groups={config.n_query_groups}"
        f" intermediate_size={config.intermediate_size}"
    )
    for when in ("before", "after"):
        joules = report.get(f"forward_j_per_token_{when}")
        if joules is not None:
            print(f"forward J/token {when}: {joules:.3g} [source: {report['energy_source']}]")
    path = "pruned_final.ckpt"
    trainer.save_checkpoint(path)
    (in_memory,) = trainer.validate(model, datamodule=dm, verbose=False)
    print(f"val_loss (in memory): {in_memory['val_loss']:.4f}")
    print(f"generated: {generate(model, b'def ', 24)!r}")
    fresh_trainer = L.Trainer(
        logger=False, enable_progress_bar=False, limit_val_batches=8, callbacks=[StructuredPruning(**schedule)]
    )
    (loaded,) = fresh_trainer.validate(LlamaLM(), datamodule=dm, ckpt_path=path, verbose=False)
    print(f"val_loss (fresh model + {path}): {loaded['val_loss']:.4f}")


if __name__ == "__main__":
    main()
