"""kdexp: knowledge distillation experiments for pre-trained language models on GLUE."""

__version__ = "0.1.0"
