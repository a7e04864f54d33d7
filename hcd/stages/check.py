"""Stage ``check``: validate ``params.yaml`` before any other stage runs.

DVC builds each stage's command line and output paths from params *before* any
hcd code runs: ``foreach: ${backbones}`` puts every backbone name into a shell
command (``python workflow/scripts/train.py <name> …``) and into output paths
(``models/<name>/``) that DVC deletes before running the stage. A name such as
``x;touch /tmp/pwned;#`` or ``../../../some/dir`` — in ``params.yaml``, from
``dvc exp run -S``, or from a shared overlay — would reach DVC's shell, or make
DVC delete a folder outside the repository, before hcd's own schema check.

So every other stage depends on this stage's output, and this stage depends on
``params.yaml`` itself: whenever the file changes, DVC (and Snakemake, which also
validates the file when it reads the Snakefile) runs this check first, and a bad
value stops the whole run here with one line naming the key — before any
command holding a value, and before any output is removed. The output holds no
values, only a constant marker, so a valid change reruns nothing downstream by
itself; each stage still reruns on the params keys it declares.
"""

from __future__ import annotations

import argparse
import sys

from hcd.atomic import clean_stale_temps, write_json
from hcd.pipeline.params import load_params

MARKER = {"params.yaml": "valid", "checked_by": "hcd check (hcd/check.py)"}  # constant: reruns nothing downstream


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd check", description="validate params.yaml before any other stage runs")
    ap.add_argument("params", help="the params file to validate (params.yaml)")
    ap.add_argument("--out", required=True, help="marker file every other stage depends on")
    args = ap.parse_args(argv)
    clean_stale_temps(args.out)
    params = load_params(args.params)
    write_json(args.out, MARKER)
    print(f"check: {args.params} is valid ({len(params.backbones)} backbones: {', '.join(params.backbones)})", file=sys.stderr)
