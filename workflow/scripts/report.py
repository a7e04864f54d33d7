"""Entry point of the ``report`` stage for DVC and Snakemake; the logic is in ``hcd.stages.report``.

Usage: python workflow/scripts/report.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a clone without installing

from hcd.cli import run_stage  # noqa: E402
from hcd.stages.report import main  # noqa: E402

if __name__ == "__main__":
    run_stage(main, "report")
