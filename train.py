"""Train adapters: ``python train.py experiment=demo`` (the logic lives in kr_vlm.cli)."""

from kr_vlm.cli import train_main

if __name__ == "__main__":
    train_main()
