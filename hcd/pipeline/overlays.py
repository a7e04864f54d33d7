"""Configuration overlays: ``configs/*.yaml`` hold a few keys that turn the default
recipe into another one (the notebooks A–E, a GPU recipe, ...).

    hcd params apply configs/notebook-E.yaml     # merge into params.yaml (comments kept)
    hcd params flags configs/notebook-E.yaml     # the same as `dvc exp run -S` flags

Both validate the merged result against the schema exactly as the stages do,
before anything is written or printed: a bad value (a backbone name holding
shell syntax, say) never reaches ``params.yaml`` or DVC.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from hcd.atomic import atomic_path
from hcd.errors import HcdError, excerpt
from hcd.pipeline.params import Params, _format_error, missing_model_entry

OVERLAY_META = "description"  # an overlay's own note, not a params key


def read_overlay(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise HcdError(f"{path}: overlay not found") from None
    except yaml.YAMLError:
        raise HcdError(f"{path}: not valid YAML") from None
    if not isinstance(data, dict):
        raise HcdError(f"{path}: expected a mapping of params keys")
    data.pop(OVERLAY_META, None)
    return data


def _merge(base: Any, over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def flatten(over: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in over.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _entries_changed(doc: Any, over: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The ``models`` entries an overlay that sets ``backbones`` adds (``{}``, nothing overridden) and drops:
    a params file holds one entry per backbone (hcd.pipeline.params.missing_model_entry)."""
    if not isinstance(over.get("backbones"), list) or not isinstance(doc.get("models", {}), dict):
        return [], []
    models = doc.get("models") or {}
    listed = [b for b in over["backbones"] if isinstance(b, str)]
    return [b for b in listed if b not in models], [m for m in models if m not in listed]


def merged(overlay: Path, params: Path) -> str:
    """``params`` with ``overlay`` merged in (comments kept), validated exactly as the stages validate it.
    An overlay that sets ``backbones`` also sets which ``models`` entries exist: kept backbones keep theirs."""
    return _merge_checked(overlay, params)[0]


def _merge_checked(overlay: Path, params: Path) -> tuple[str, dict[str, Any], list[str], list[str]]:
    """The merged text, the overlay, and the ``models`` entries the merge added and dropped."""
    rt = YAML()
    rt.preserve_quotes = True
    try:
        doc = rt.load(params.read_text())
    except FileNotFoundError:
        raise HcdError(f"{params}: file not found (run from the repository root)") from None
    over = read_overlay(overlay)
    _check_types(overlay, params, over)
    added, dropped = _entries_changed(doc, over)
    _merge(doc, over)
    if added or dropped:
        models = doc.get("models") or CommentedMap()
        for name in dropped:
            del models[name]
        for name in added:
            models.setdefault(name, CommentedMap())
        doc["models"] = models
    buf = io.StringIO()
    rt.dump(doc, buf)
    from pydantic import ValidationError

    raw = yaml.safe_load(buf.getvalue())
    try:
        Params.model_validate(raw)
    except ValidationError as err:
        raise HcdError(_format_error(overlay, err)) from None
    problem = missing_model_entry(raw)
    if problem:
        raise HcdError(f"{overlay}: {problem}")
    return buf.getvalue(), over, added, dropped


def _check_types(overlay: Path, params: Path, over: dict[str, Any]) -> None:
    """The overlay merged into the plain params, validated before the comment-keeping merge writes any text: a
    nested list where a name should be is one line, not a YAML error from re-reading that text."""
    from pydantic import ValidationError

    plain = yaml.safe_load(params.read_text()) or {}
    _merge(plain, copy.deepcopy(over))
    try:
        Params.model_validate(plain)
    except ValidationError as err:
        problem = _format_error(overlay, err)
        if "models" not in problem.split(": ")[1]:  # entries added or dropped with backbones: checked after the merge
            raise HcdError(problem) from None


def apply(overlay: Path, params: Path) -> None:
    text = merged(overlay, params)
    with atomic_path(params) as tmp:
        tmp.write_text(text)


# White space and glob characters: DVC's -S override grammar (Hydra's) would not take such a value as written.
_UNSAFE_WORD = re.compile(r"[\s*?]")


def flags(overlay: Path, params: Path) -> str:
    """``-S key=value`` flags for ``dvc exp run``, after the same validation as :func:`apply`."""
    _, over, added, dropped = _merge_checked(overlay, params)  # refuses what apply would refuse: a bad name never reaches DVC
    items = flatten(over) + [(f"models.{b}", {}) for b in added if b not in (over.get("models") or {})]
    # `++key=value` sets a key whether or not params.yaml has it yet; `~key` removes one
    out = [w for name in dropped for w in ("-S", f"~models.{name}")]
    for key, value in items:
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        word = f"++{key}={text}"
        if _UNSAFE_WORD.search(word):
            raise HcdError(f"{overlay}: {key}: {excerpt(text)} holds white space or a glob character, which DVC's -S overrides do not take as written; use `hcd params apply {overlay}` instead")
        out += ["-S", word]
    return shlex.join(out)  # quoted by the standard library: safe to paste, and to `eval "dvc exp run $(…)"`


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd params", description="apply a configuration overlay to params.yaml, or print it as `dvc exp run -S` flags")
    ap.add_argument("action", choices=["apply", "flags"], help="apply: merge into params.yaml (comments kept); flags: print -S flags for `dvc exp run`")
    ap.add_argument("overlay", help="a YAML file of params keys, e.g. configs/notebook-E.yaml")
    ap.add_argument("--params", default="params.yaml", help="the params file to merge into or validate against (default: params.yaml)")
    args = ap.parse_args(argv)
    overlay = Path(args.overlay)
    if args.action == "apply":
        apply(overlay, Path(args.params))
        print(f"applied {overlay} to {args.params}", file=sys.stderr)
    else:
        print(flags(overlay, Path(args.params)))
