"""zimagekit: the Z-Image system (S3-DiT, pipeline, training, distillation, RL) in PyTorch."""

__version__ = "0.1.0"
