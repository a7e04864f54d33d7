"""``hcd push`` / ``hcd pull``: share a run through a DVC remote, so a colleague reruns nothing.

``dvc push`` uploads everything the pipeline caches (the archive, the packed
arrays, the models, the predictions, the bundle, the confusion plot); the small metrics and curves
travel in git. ``hcd pull`` is ``dvc pull`` plus the step a fresh clone needs for
Snakemake: a clone and a pull give every file a new modification time in no
particular order, and Snakemake — which has no record of a run it did not do —
would take an input written after its output as changed and rerun the pipeline.
So after a complete pull (``dvc status`` clean: every output is the one
``dvc.lock`` names) ``snakemake --touch`` sets the times in pipeline order.

Both first connect to the remote, so an unreachable one is one line naming the
remote, its address and the cause, before DVC starts; nothing local is changed
or deleted by a failed push or pull. Set a remote up with ``dvc remote add -d``
(README, *Remote storage*: S3, GCS, SSH, a shared folder).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from hcd.errors import HcdError, excerpt


def _address(url: str) -> str:
    """The remote's URL as safe to print: no password (``ssh://user:secret@host`` -> ``ssh://user@host``), no query
    or fragment (a presigned URL's ``?X-Amz-Signature=…``, an Azure SAS token: ``…?…``), no control characters."""
    url = re.sub(r"(//[^/@:]+):[^/@]*@", r"\1@", url)
    url = re.sub(r"[?#].*", "?…", url, flags=re.S)
    return "".join(c if c.isprintable() else "?" for c in url)[:300]


def probe(name: str | None) -> tuple[str, str]:
    """The remote's name and address, once a connection to it has worked; else :class:`HcdError`, one line."""
    from dvc.repo import Repo

    try:
        repo = Repo()
    except Exception as exc:  # noqa: BLE001 - DVC's own errors: not a DVC repository, a broken config, ...
        raise HcdError(f"not a DVC repository here ({excerpt(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)})") from None
    remotes = repo.config.get("remote", {})
    name = name or repo.config["core"].get("remote")
    if not name:
        raise HcdError("no default DVC remote: add one with `dvc remote add -d NAME URL` (README, Remote storage), or name one with -r")
    if name not in remotes:
        raise HcdError(f"remote {name!r}: not configured (configured: {', '.join(sorted(remotes)) or 'none'})")
    address = _address(str(remotes[name].get("url", "?")))
    try:
        odb = repo.cloud.get_remote_odb(name)
        odb.fs.exists(odb.path)
    except Exception as exc:  # noqa: BLE001 - whatever the file system raises: refused, DNS, auth, permissions
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        cause = re.sub(r"\w[\w+.-]*://\S+", lambda m: _address(m.group(0)), cause)  # a URL inside the message: as safe
        cause = "".join(c for c in cause if c.isprintable())[:200]
        raise HcdError(f"remote {name!r} ({address}): cannot connect: {cause}") from None
    return name, address


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise HcdError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}; its messages are above); nothing local was deleted")


def push(remote: str | None, jobs: int | None) -> None:
    name, address = probe(remote)
    print(f"hcd push: to {name} ({address})", file=sys.stderr)
    _run(["dvc", "push", "-r", name, *(["-j", str(jobs)] if jobs else [])])


def pull(remote: str | None, jobs: int | None, touch: bool) -> None:
    name, address = probe(remote)
    print(f"hcd pull: from {name} ({address})", file=sys.stderr)
    _run(["dvc", "pull", "-r", name, *(["-j", str(jobs)] if jobs else [])])
    status = subprocess.run(["dvc", "status", "--quiet"], capture_output=True, text=True)
    if status.returncode != 0:
        print("hcd pull: `dvc status` shows changes (the pull was partial, or the pipeline changed since the push): Snakemake's file times left as they are, so it reruns what is out of date", file=sys.stderr)
        return
    if touch:
        _run(["snakemake", "--touch", "--cores", "1", "--quiet"])
        print("hcd pull: every output is the one dvc.lock names; `dvc repro` and `snakemake` have nothing to rerun", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd push|pull", description="upload (push) or download (pull) the pipeline's cached outputs through a DVC remote; pull also makes Snakemake take the pulled files as up to date")
    ap.add_argument("action", choices=["push", "pull"])
    ap.add_argument("-r", "--remote", help="the DVC remote (default: the one `dvc remote add -d` made default)")
    ap.add_argument("-j", "--jobs", type=int, help="parallel transfers (DVC's default: 4 x CPUs)")
    ap.add_argument("--no-touch", action="store_true", help="pull only: leave file times alone (Snakemake will rerun stages whose inputs look newer)")
    args = ap.parse_args(argv)
    if args.action == "push":
        push(args.remote, args.jobs)
    else:
        pull(args.remote, args.jobs, not args.no_touch)
