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
