"""The wheels the GPU machine lacks, at this repository's pinned versions, for `gpu_check.sh --wheels`.

The device tool's GPU machine reaches no network and runs its own image's python3 (3.12, with torch,
timm, numpy, pandas, onnx... at the image's versions). What hcd needs beyond that image must be carried
there as wheels. Carrying `dvclive` alone is not enough: its ``Live`` imports ``dvc.repo``, so the train
stage needs DVC's whole closure (scmrepo, dvc-data, pygit2, ...). Found by running the GPU steps in a
Python 3.12 venv holding the image's packages (2026-12-01): the train tests failed with
"No module named 'dvc'".

Steps (here, with network):
1. resolve hcd's dependencies (pyproject, without Snakemake: the GPU steps run stages through ``hcd``)
   for Python 3.12 from scratch, under ``constraints.txt`` — a dry run, nothing installed;
2. drop what the image holds (the package list in the device tool's KINDS.md);
3. download the rest at the resolved versions (``--no-deps``), building a wheel where PyPI has only
   an sdist (grad-cam, antlr4: pure Python), so that the machine, offline, installs with no build;
4. write ``requirements.txt`` beside them (the list, for the record). There, gpu_check.sh installs them
   with ``--no-deps``: none is in the image, and the image's own versions stay as they are. And
   ``image-requirements.txt``: the image's side of the closure, at the versions the page saw there, from
   which ``gpu_check.sh --rehearse`` builds a CPU venv that stands in for the image.

Usage: python3 benchmarks/gpu_wheels.py OUT_DIR [--python PYTHON3.12] [--image-list KINDS.md]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = Path("/work/.library/device/KINDS.md")  # the device tool's page: "Packages: a, b, ..."
NOT_CARRIED = {"snakemake"}  # the GPU steps run each stage through `hcd`, not an engine
# pins of this (Python 3.11) machine that have no Python 3.12 wheel: left to the resolver
NO_312_WHEEL = {"orjson"}  # 3.8.3; dvc-data and sqltrie take any orjson


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def req_name(line: str) -> str:
    """The normalised package name of a requirement or constraint line ("" for a comment or blank)."""
    return norm(re.split(r"[<>=!~ ;\[#]", line.strip())[0])


def image_packages(kinds: Path) -> set[str]:
    text = kinds.read_text()
    m = re.search(r"holds these.*?Packages: (.*?)\.\s*$", text, re.S | re.M)
    if not m:
        raise SystemExit(f"{kinds}: no 'Packages: ...' list of the GPU image")
    return {norm(p) for p in m.group(1).split(",")}


def image_versions(kinds: Path) -> dict[str, str]:
    """The versions a session's ``pip list`` saw on the image (the page's "filtered by the names it asked
    for: name version, ..." row): torch, torchvision, numpy, onnx... as they are there."""
    m = re.search(r"filtered by the names it asked for: (.*?) \|", kinds.read_text())
    return {norm(n): v for n, v in re.findall(r"([\w.-]+) (\d[\w.+]*)", m.group(1))} if m else {}


def rehearsal_requirements(closure: list[dict], have: set[str], seen: dict[str, str]) -> list[str]:
    """A requirements list for a venv that stands in for the image on a CPU machine: the closure's
    packages that the image holds, at the versions seen there where the page gives one (the rest at
    the newest: the page lists names only)."""
    wanted = {"torch", "torchvision", "numpy", "onnx", "onnxruntime", "onnxscript", "safetensors", "pytest", "pytest-xdist", "hypothesis"}  # + the GPU steps' test tools
    names = sorted({norm(i["metadata"]["name"]) for i in closure if norm(i["metadata"]["name"]) in have} | (wanted & have))
    return [f"{n}=={seen[n]}" if n in seen else n for n in names if n == "nvidia-ml-py" or not (n.startswith(("nvidia-", "cuda-")) or n == "triton")]  # torch brings its CUDA wheels


def python312() -> str:
    """pyenv's 3.12 first: on PATH, python3.12 may be a pyenv shim that fails where 3.12 is not selected."""
    found = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    return str(found[-1]) if found else shutil.which("python3.12") or "python3.12"


def resolve(python: str, tmp: Path) -> list[dict]:
    """hcd's dependency closure for ``python`` (3.12), every version as constraints.txt pins it."""
    read = "import json, sys, tomllib; print(json.dumps(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))"  # 3.11+
    listed = json.loads(subprocess.run([python, "-c", read, str(REPO / "pyproject.toml")], check=True, capture_output=True, text=True).stdout)
    deps = [d for d in listed if req_name(d) not in NOT_CARRIED]
    (tmp / "req.txt").write_text("\n".join(deps) + "\n")
    pins = [ln for ln in (REPO / "constraints.txt").read_text().splitlines() if req_name(ln) not in NO_312_WHEEL]
    (tmp / "cons.txt").write_text("\n".join(pins) + "\n")
    report = tmp / "report.json"
    cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--prefer-binary", "--quiet", "--report", str(report), "-c", str(tmp / "cons.txt"), "-r", str(tmp / "req.txt")]
    subprocess.run(cmd, check=True)
    return json.loads(report.read_text())["install"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--python", default=python312(), help="a Python 3.12, the GPU image's (default: pyenv's, else python3.12 on PATH)")
    ap.add_argument("--image-list", type=Path, default=KINDS, help="the device tool's KINDS.md, whose 'Packages:' line lists the image's packages")
    args = ap.parse_args(argv)
    try:
        subprocess.run([args.python, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"gpu_wheels: {args.python} is not a working Python 3.12 (the GPU image's); name one with --python") from None
    have = image_packages(args.image_list)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for old in args.out_dir.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        closure = resolve(args.python, tmp)
        carry = [(i["metadata"]["name"], i["metadata"]["version"], i["download_info"]["url"]) for i in closure if norm(i["metadata"]["name"]) not in have]
        if any(norm(n) in ("torch", "torchvision") for n, _, _ in carry):
            raise SystemExit(f"gpu_wheels: {args.image_list} does not list torch among the image's packages; not carrying gigabytes")
        wheels = [f"{n}=={v}" for n, v, url in carry if url.endswith(".whl")]
        sdists = [f"{n}=={v}" for n, v, url in carry if not url.endswith(".whl")]
        pip = [args.python, "-m", "pip"]
        subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(args.out_dir), *wheels], check=True)
        if sdists:  # pure-Python sdists: built here once, so the offline machine needs no build backend
            subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(args.out_dir), *sdists], check=True)
    (args.out_dir / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v, _ in carry))
    # for `gpu_check.sh --rehearse`: what a CPU venv needs to stand in for the image
    seen = image_versions(args.image_list)
    if not seen:
        print(f"gpu_wheels: warning: {args.image_list} gives no versions seen on the image; a rehearsal takes the newest torch", file=sys.stderr)
    (args.out_dir / "image-requirements.txt").write_text("".join(f"{r}\n" for r in rehearsal_requirements(closure, have, seen)))
    size = sum(p.stat().st_size for p in args.out_dir.glob("*.whl"))
    print(f"{len(carry)} wheels ({size / 2**20:.1f} MiB) in {args.out_dir}; {len(closure) - len(carry)} packages of the closure are in the image", file=sys.stderr)


if __name__ == "__main__":
    main()
