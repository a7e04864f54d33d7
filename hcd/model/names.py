"""Which backbone names exist, answered without importing timm (and torch) where possible.

Checking a name with ``timm.is_model`` imports timm, which imports torch: ~4-7 s
on a 2-core machine, paid by every ``snakemake`` invocation (the Snakefile
validates params) and the ``check`` stage. So the names of the pinned timm
version ship in ``timm_names.txt``; when the installed timm is that version
(``importlib.metadata``, no import), the list answers. Another timm version falls
back to ``timm.is_model``, so a name is never refused wrongly.
``python -m hcd.model.names`` rewrites the list for the installed timm.
"""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path

LIST = Path(__file__).with_name("timm_names.txt")
CUSTOM = frozenset({"cnn"})


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[str, frozenset[str]]:
    lines = LIST.read_text().splitlines()
    version = lines[0].split()[2].rstrip(":")  # "# timm 1.0.31: ..."
    return version, frozenset(line for line in lines[1:] if line and not line.startswith("#"))


def installed_timm() -> str | None:
    try:
        return metadata.version("timm")
    except metadata.PackageNotFoundError:
        return None


def is_backbone(name: str) -> bool:
    """``cnn``, or a timm model name (a pretrained tag after ``.`` allowed, as in ``resnet18.a1_in1k``)."""
    if name in CUSTOM:
        return True
    version, names = _shipped()
    if installed_timm() == version:
        return name.split(".", 1)[0] in names
    import timm  # another timm: ask it

    return bool(timm.is_model(name))


def write_list() -> None:
    import timm

    names = sorted(timm.list_models())
    LIST.write_text(f"# timm {timm.__version__}: its {len(names)} model names (timm.list_models()); written by `python -m hcd.model.names`\n" + "\n".join(names) + "\n")
    print(f"wrote {LIST}: {len(names)} names of timm {timm.__version__}")


if __name__ == "__main__":
    write_list()
