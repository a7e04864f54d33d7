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
from pathlib import Path

from hcd.atomic import clean_stale_temps, write_json
from hcd.pipeline.params import load_params
from hcd.pipeline.prune import stale_outputs

# Constant, so a valid change reruns nothing downstream. Every stage depends on this file's bytes:
# editing the text (it names the module's path before hcd/stages/) would rerun every stage, training
# included, in every user's checkout once — so it stays as it is.
MARKER = {"params.yaml": "valid", "checked_by": "hcd check (hcd/check.py)"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd check", description="validate params.yaml before any other stage runs")
    ap.add_argument("params", help="the params file to validate (params.yaml)")
    ap.add_argument("--out", required=True, help="marker file every other stage depends on")
    args = ap.parse_args(argv)
    clean_stale_temps(args.out)
    params = load_params(args.params)
    write_json(args.out, MARKER)
    print(f"check: {args.params} is valid ({len(params.backbones)} backbones: {', '.join(params.backbones)})", file=sys.stderr)
    warn_stale(params.backbones, Path(args.params).parent)


def warn_stale(backbones: list[str], root: Path) -> None:
    """One line when a dropped backbone's outputs are still here (hcd.pipeline.prune says why that matters)."""
    stale = stale_outputs(backbones, root)
    if stale:
        shown = ", ".join(str(p.relative_to(root)) for p in stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        print(f"check: warning: {shown}: left by a backbone no longer in backbones; DVC would record it among the inputs of "
              "ensemble, metrics, report and export (a fresh clone would rerun them): `hcd pipeline prune` removes it", file=sys.stderr)
