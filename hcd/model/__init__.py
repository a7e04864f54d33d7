"""Models: building backbones (timm or the small CNN), weights files and ``model.json``,
inference with test-time augmentation, and training checkpoints."""
