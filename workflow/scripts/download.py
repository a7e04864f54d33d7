"""Entry point of the ``download`` stage for DVC and Snakemake; the logic is in ``hcd.download``.

Usage: python workflow/scripts/download.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a clone without installing

from hcd.cli import run_stage  # noqa: E402
from hcd.stages.download import main  # noqa: E402

if __name__ == "__main__":
    run_stage(main, "download")
