"""hcd — reproducible histopathologic cancer detection.

All stage logic lives in this package; ``workflow/scripts/*.py`` are thin entry
points that DVC and Snakemake both call with the same command lines
(see :mod:`hcd.pipeline`, the one stage table both engines are built from).
"""

__version__ = "0.1.0"
PATCH_SHAPE = (96, 96, 3)  # every Kaggle/PCam patch: 96x96 RGB uint8
