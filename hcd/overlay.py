"""Configuration overlays: ``configs/*.yaml`` hold a few keys that turn the default
recipe into another one (the notebooks A–E, a GPU recipe, ...).

    hcd params apply configs/notebook-E.yaml     # merge into params.yaml (comments kept)
    hcd params flags configs/notebook-E.yaml     # the same as `dvc exp run -S` flags

The merged result is validated against the schema before anything is written.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from hcd.errors import HcdError
from hcd.io import atomic_path
from hcd.params import Params, _format_error

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


def apply(overlay: Path, params: Path) -> None:
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params.read_text())
    _merge(doc, read_overlay(overlay))
    buf = io.StringIO()
    rt.dump(doc, buf)
    from pydantic import ValidationError

    try:
        Params.model_validate(yaml.safe_load(buf.getvalue()))
    except ValidationError as err:
        raise HcdError(_format_error(overlay, err)) from None
    with atomic_path(params) as tmp:
        tmp.write_text(buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd params", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["apply", "flags"])
    ap.add_argument("overlay")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    overlay = Path(args.overlay)
    if args.action == "apply":
        apply(overlay, Path(args.params))
        print(f"applied {overlay} to {args.params}", file=sys.stderr)
    else:
        print(" ".join(f"-S {k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}" for k, v in flatten(read_overlay(overlay))))
