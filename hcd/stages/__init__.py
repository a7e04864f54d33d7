"""One module per pipeline stage, each a ``main(argv)`` that parses the command line the
stage table (:mod:`hcd.pipeline.table`) gives it and calls the stage's ``run``-style function."""

# In pipeline order. The stage table (hcd.pipeline.table), the `hcd` command and the thin
# scripts in workflow/scripts/ all follow these names; tests/test_pipeline.py checks it.
NAMES = ("check", "download", "scan", "split", "stats", "train", "predict", "explain", "ensemble", "metrics", "report", "export")
GPU_STAGES = ("train", "predict", "explain")  # each claims a free GPU before CUDA starts (hcd.runtime.gpuslots); Snakemake resource gpu=1
