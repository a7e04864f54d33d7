"""Outputs left by backbones no longer in ``backbones``: find them, and remove them on request.

Neither engine deletes the outputs of a stage that left the pipeline: drop a backbone
from ``backbones`` and its ``models/<b>/``, ``predictions/<b>/``, ``explain/<b>/``,
``dvclive/<b>/`` and per-backbone logs stay in the workspace. That is harmless to the
numbers (every gathering stage reads the current backbones' files by name) but not to
the records: under DVC a gathering stage depends on the enclosing folder
(``predictions/``, ``models/``), so ``dvc.lock`` would hash the leftover files too, and
a fresh clone (which never has them) would rerun ensemble, metrics, report and export;
``dvc plots show`` would keep drawing the dropped backbone's curves from its
``dvclive/<b>/dvc.yaml``.

Every place a per-backbone stage writes is derived from the stage table (each output,
gathered input and log pattern holding ``{item}``), so a new per-backbone stage is
covered without an edit here. ``hcd pipeline prune`` removes what it finds (a symlink
is unlinked, never followed); ``--dry-run`` lists it. The check stage warns when there
is anything to prune.
"""

from __future__ import annotations

import shutil
import sys
from fnmatch import fnmatchcase
from pathlib import Path

from hcd.pipeline.table import ITEM, STAGES, Stage


def backbone_patterns(stages: tuple[Stage, ...] = STAGES) -> dict[tuple[str, str], set[str]]:
    """Every place a per-backbone stage writes or a gathering stage reads, as (parent folder, entry pattern)
    → the files the table names inside that entry: ``("models", "{item}") → {"model.json", …}``,
    ``("logs/train", "{item}.log") → {""}`` (the entry is the file)."""
    found: dict[tuple[str, str], set[str]] = {}
    for stage in stages:
        patterns = [*stage.gather, *((*stage.outputs, stage.log) if stage.per_backbone else ())]
        for pattern in patterns:
            parts = Path(pattern).parts
            at = next((i for i, part in enumerate(parts) if ITEM in part), None)
            if at is not None:
                inside = str(Path(*parts[at + 1:])) if at + 1 < len(parts) else ""
                found.setdefault((str(Path(*parts[:at])), parts[at]), set()).add(inside)
    return found


def stale_outputs(backbones: list[str], root: Path = Path("."), stages: tuple[Stage, ...] = STAGES) -> list[Path]:
    """Entries under ``root`` written for a backbone that ``backbones`` no longer names. A folder counts only
    when it holds a file the table names for it (``models/<b>/model.json``…): a folder a user keeps there
    for something else (local pretrained weights) is not touched."""
    keep = set(backbones)
    stale: list[Path] = []
    for (parent, entry), inside in sorted(backbone_patterns(stages).items()):
        folder = root / parent
        if not folder.is_dir():
            continue
        prefix, suffix = entry.split(ITEM, 1)
        for path in sorted(folder.iterdir()):
            name = path.name
            if name.startswith(".") or not fnmatchcase(name, f"{prefix}*{suffix}"):
                continue
            item = name[len(prefix):len(name) - len(suffix)]
            made_by_hcd = "" in inside if not path.is_dir() else any((path / f).exists() for f in inside if f)
            if item and item not in keep and made_by_hcd:
                stale.append(path)
    return stale


def remove(path: Path) -> None:
    """Delete one leftover entry; a symlink is removed itself, its target left alone."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def prune(backbones: list[str], root: Path = Path("."), dry_run: bool = False) -> list[Path]:
    """Remove (or with ``dry_run`` only list) the outputs of dropped backbones; returns them."""
    stale = stale_outputs(backbones, root)
    for path in stale:
        print(f"{'would remove' if dry_run else 'removed'} {path}", file=sys.stderr)
        if not dry_run:
            remove(path)
    if not stale:
        print(f"nothing to prune: every per-backbone output belongs to one of {', '.join(backbones)}", file=sys.stderr)
    return stale
