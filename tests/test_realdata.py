"""The real Kaggle-layout sample (HCD_REAL_ZIP=../shared/data/hcd-real-2k.zip)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import outputs

from hcd.pipeline.params import ScanParams
from hcd.stages.scan import scan

pytestmark = pytest.mark.realdata
REAL = os.environ.get("HCD_REAL_ZIP")
INTEGRITY = {"bad_id", "bad_label", "duplicate_id", "missing_image", "unexpected_file", "unlabelled", "not_in_submission", "undecodable", "wrong_format", "conflicting_duplicate"}


@pytest.mark.skipif(not REAL, reason="set HCD_REAL_ZIP to a Kaggle-layout archive")
def test_real_sample_scans_clean(tmp_path):
    summary = scan(Path(REAL), outputs(tmp_path), ScanParams(), workers=2, log=lambda m: None)
    assert summary["train"]["labelled_rows"] == 1600
    assert summary["test"]["submission_rows"] == 400 and summary["test"]["packed"] == 400
    report = pd.read_csv(tmp_path / "scan/report.csv")
    assert not set(report["reason"]) & INTEGRITY, report
    # only outliers (near-white/black) may be dropped
    assert summary["train"]["packed"] == 1600 - int(report["reason"].isin(["dark", "bright"]).sum())
    x = np.load(tmp_path / "packed/train_x.npy", mmap_mode="r")
    assert x.shape == (summary["train"]["packed"], 96, 96, 3)
    assert 0.3 < summary["train"]["positive_fraction"] < 0.5
