"""The tiny GPT from a LightningCLI YAML file: callbacks and strategy configured by class_path / name.

python examples/tiny_gpt_cli.py fit --config examples/tiny_gpt.yaml
python examples/tiny_gpt_cli.py fit --config examples/tiny_gpt.yaml --trainer.devices 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning.pytorch.cli import LightningCLI  # noqa: E402
from tinygpt_model import ByteDataModule, TinyGPT  # noqa: E402

import lightning_green  # noqa: E402,F401  (registers "ddp_green" for the YAML)


def main(args=None):
    return LightningCLI(TinyGPT, ByteDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
