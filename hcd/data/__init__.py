"""Patches: reading Kaggle-layout sources (zip or folder), decoding TIFFs, the packed arrays,
batches served from them, batched augmentation, and the synthetic demo dataset."""
