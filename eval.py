"""Evaluate adapters or zero-shot CLIP: ``python eval.py experiment=clip_zeroshot data=eurosat``."""

from kr_vlm.cli import eval_main

if __name__ == "__main__":
    eval_main()
