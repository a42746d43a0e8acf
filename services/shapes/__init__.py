"""The shapes task: synthetic pictures of coloured shapes with questions that have one right
answer, for training a tiny Qwen2-VL that really looks at the image (tools/train_shapes.py) and
scoring any checkpoint on held-out questions through transformers and through a mesh (`eval`)."""

from pathlib import Path

# Where tools/train_shapes.py writes its checkpoint by default: inside the package, so the CLI
# can ship it as its default model once a trained one meets the accuracy bar.
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-qwen2-vl"
