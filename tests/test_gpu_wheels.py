"""benchmarks/gpu_wheels.py reads the GPU image's package list from the device tool's page, so that what
the image holds is not carried (torch alone would be gigabytes) and what it lacks is."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_wheels  # noqa: E402

PAGE = """## Python packages already there

nvidia-h200: their image, 'cuda', holds these, as last read on a machine running it on 2026-11-17. Carry one only for another version. Packages: absl-py, numpy, opencv-python-headless, ruamel.yaml, torch, typing_extensions, zipp.
"""


def test_the_image_list_is_read_with_normalised_names(tmp_path):
    page = tmp_path / "KINDS.md"
    page.write_text(PAGE)
    have = gpu_wheels.image_packages(page)
    assert have == {"absl-py", "numpy", "opencv-python-headless", "ruamel-yaml", "torch", "typing-extensions", "zipp"}
    assert gpu_wheels.norm(" Typing_Extensions") in have  # pip's report spells names its own way


def test_a_page_without_the_list_is_refused_naming_the_file(tmp_path):
    page = tmp_path / "KINDS.md"
    page.write_text("## nvidia-h200\n| machine | one GPU |\n")
    with pytest.raises(SystemExit, match=r"KINDS\.md: no 'Packages: \.\.\.' list"):
        gpu_wheels.image_packages(page)


def test_the_rehearsal_venv_takes_the_image_versions_the_page_saw(tmp_path):
    """``gpu_check.sh --rehearse`` stands in for the image on a CPU: torch and numpy at the image's versions
    (the page's pip-list row), the closure's other image packages by name, never torch's CUDA wheels."""
    page = tmp_path / "KINDS.md"
    row = "| pip list, as a session saw it | 2026-11: One session's pip list, filtered by the names it asked for: numpy 2.5.2, torch 2.11.0, torchvision 0.26.0, huggingface_hub 1.33.0 |\n"
    page.write_text(row + PAGE)
    seen = gpu_wheels.image_versions(page)
    assert seen == {"numpy": "2.5.2", "torch": "2.11.0", "torchvision": "0.26.0", "huggingface-hub": "1.33.0"}
    closure = [{"metadata": {"name": n}} for n in ("numpy", "zipp", "nvidia-cublas", "dvc", "typing_extensions")]
    have = gpu_wheels.image_packages(page) | {"nvidia-cublas", "torchvision"}
    assert gpu_wheels.rehearsal_requirements(closure, have, seen) == ["numpy==2.5.2", "torch==2.11.0", "torchvision==0.26.0", "typing-extensions", "zipp"]
