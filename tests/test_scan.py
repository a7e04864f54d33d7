"""Scan: every planted defect found with the right reason; packing; bad input."""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, encode_patch, hexid, make_archive, outputs, patch

from hcd.data.source import ZipSource
from hcd.data.synth import planted_defects, truth
from hcd.data.tiff import decode_patch
from hcd.errors import HcdError
from hcd.pipeline.params import ScanParams
from hcd.stages.scan import scan


def report(root):
    return pd.read_csv(root / "scan/report.csv", dtype={"id": str})


def run(archive, root, workers=1, **kw):
    return scan(archive, outputs(root), ScanParams(**kw), workers=workers, log=lambda m: None)


def test_every_planted_defect_is_found_with_its_reason(tiny_archive, tmp_path):
    summary = run(tiny_archive, tmp_path)
    rep = report(tmp_path)
    got = {(s, r): set(g["id"]) for (s, r), g in rep.groupby(["split", "reason"])}
    planted = planted_defects(TINY)
    for reason in ("dark", "bright", "undecodable", "wrong_format", "conflicting_duplicate"):
        assert got[("train", reason)] == set(planted[reason]), reason
    assert got[("test", "bright")] == set(planted["test_bright"])
    assert got[("test", "undecodable")] == set(planted["test_undecodable"])
    assert len(rep) == sum(len(v) for v in planted.values()), "nothing else is flagged"
    # conflicting duplicates, undecodable and wrong-format never reach the packed arrays
    index = pd.read_csv(tmp_path / "packed/train_index.csv", dtype={"id": str})
    dropped = set().union(*(planted[r] for r in ("dark", "bright", "undecodable", "wrong_format", "conflicting_duplicate")))
    assert not dropped & set(index["id"])
    assert summary["train"]["packed"] == TINY.n_train - len(dropped)
    assert summary["flagged"]["train_conflicting_duplicate"] == 2


def test_packed_rows_are_the_decoded_patches_in_label_order(tiny_archive, tmp_path):
    run(tiny_archive, tmp_path)
    x = np.load(tmp_path / "packed/train_x.npy", mmap_mode="r")
    index = pd.read_csv(tmp_path / "packed/train_index.csv", dtype={"id": str})
    assert x.shape == (len(index), 96, 96, 3) and x.dtype == np.uint8
    with zipfile.ZipFile(tiny_archive) as zf:
        order = pd.read_csv(zf.open("train_labels.csv"), dtype={"id": str})["id"].tolist()
        pos = {pid: k for k, pid in enumerate(order)}
        assert index["id"].map(pos).is_monotonic_increasing
        labels = truth(TINY).train.set_index("id")["label"]
        for r in index.sample(25, random_state=0).itertuples():
            np.testing.assert_array_equal(x[r.row], decode_patch(zf.read(f"train/{r.id}.tif")))
            assert r.label == labels[r.id]


def test_every_submission_id_gets_a_row_even_when_defective(tiny_archive, tmp_path):
    run(tiny_archive, tmp_path)
    with zipfile.ZipFile(tiny_archive) as zf:
        sub = pd.read_csv(zf.open("sample_submission.csv"), dtype={"id": str})
    test_index = pd.read_csv(tmp_path / "packed/test_index.csv", dtype={"id": str}, keep_default_na=False)
    assert test_index["id"].tolist() == sub["id"].tolist()
    x = np.load(tmp_path / "packed/test_x.npy", mmap_mode="r")
    assert len(x) == len(sub)
    bad = planted_defects(TINY)["test_undecodable"][0]
    row = int(test_index.index[test_index["id"] == bad][0])
    assert test_index.loc[row, "flag"] == "undecodable" and not x[row].any()


def test_outliers_kept_when_params_say_so(tiny_archive, tmp_path):
    run(tiny_archive, tmp_path, drop_outliers=False)
    index = pd.read_csv(tmp_path / "packed/train_index.csv", dtype={"id": str})
    planted = planted_defects(TINY)
    outliers = set(planted["dark"]) | set(planted["bright"])
    assert set(index.loc[index["outlier"] == 1, "id"]) == outliers
    rep = report(tmp_path)
    assert not rep.loc[rep["reason"].isin(["dark", "bright"]) & (rep["split"] == "train"), "dropped"].any()


def test_thresholds_come_from_params(tiny_archive, tmp_path):
    run(tiny_archive, tmp_path, bright_min=255)  # planted bright patches have pixels down to 247
    assert "bright" not in set(report(tmp_path).query("split == 'train'")["reason"])


def test_two_workers_write_exactly_what_one_writes(tiny_archive, tmp_path):
    run(tiny_archive, tmp_path / "a", workers=1)
    run(tiny_archive, tmp_path / "b", workers=2)
    for rel in ("packed/train_x.npy", "packed/train_index.csv", "packed/test_x.npy", "packed/test_index.csv", "scan/report.csv", "scan/summary.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_folder_source_gives_the_same_outputs_as_the_zip(tiny_archive, tmp_path):
    with zipfile.ZipFile(tiny_archive) as zf:
        zf.extractall(tmp_path / "extracted")
    run(tiny_archive, tmp_path / "a")
    run(tmp_path / "extracted", tmp_path / "b")
    for rel in ("packed/train_x.npy", "packed/test_x.npy", "packed/train_index.csv", "scan/report.csv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_table_defects(small_set, tmp_path):
    train, _, test = small_set
    train = dict(train)
    train[hexid(50)] = encode_patch(patch(50))  # a patch without a label row
    train["notes.txt"] = b"hello"  # a misnamed member
    train[hexid(60)] = encode_patch(patch(0))  # same pixels as hexid(0), same label 0
    labels = (
        "id,label\n"
        + "".join(f"{hexid(i)},{i % 2}\n" for i in range(6))
        + f"{hexid(60)},0\n"
        + f"{hexid(7)},1\n"  # no image
        + f"{hexid(1)},1\n"  # duplicate id, same label
        + f"{hexid(3)},0\n"  # duplicate id, conflicting label
        + "XYZ,1\n"  # not hex
        + f"{hexid(8)},2\n{hexid(9)},yes\n{hexid(10)},\n{hexid(11)},-1\n"
    )
    arc = make_archive(tmp_path / "a.zip", train, labels, test)
    run(arc, tmp_path / "out")
    rep = report(tmp_path / "out").set_index("id")
    assert rep.loc[hexid(50), "reason"] == "unlabelled"
    assert rep.loc["train/notes.txt", "reason"] == "unexpected_file"
    assert rep.loc[hexid(60), "reason"] == "duplicate"
    assert rep.loc[hexid(7), "reason"] == "missing_image"
    assert rep.loc[hexid(1), "reason"] == "duplicate_id" and not rep.loc[hexid(1), "dropped"]
    assert rep.loc[hexid(3), "reason"] == "duplicate_id" and rep.loc[hexid(3), "dropped"]
    assert rep.loc["XYZ", "reason"] == "bad_id"
    for i in (8, 9, 10, 11):
        assert rep.loc[hexid(i), "reason"] == "bad_label"
    index = pd.read_csv(tmp_path / "out/packed/train_index.csv", dtype={"id": str})
    assert sorted(index["id"]) == sorted([hexid(0), hexid(1), hexid(2), hexid(4), hexid(5)])


def test_labels_csv_with_bom_crlf_and_extra_columns_is_read(small_set, tmp_path):
    train, labels, test = small_set
    crlf = ("\ufeff" + labels.replace("id,label", "id,label,note").replace(",0\n", ",0,x\n").replace(",1\n", ",1,y\n")).replace("\n", "\r\n")
    summary = run(make_archive(tmp_path / "a.zip", train, crlf.encode("utf-8"), test), tmp_path / "out")
    assert summary["train"]["packed"] == 6 and report(tmp_path / "out").empty


def test_nested_top_folder_is_accepted(small_set, tmp_path):
    train, labels, test = small_set
    arc = tmp_path / "nested.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("histopathologic-cancer-detection/train_labels.csv", labels)
        zf.writestr("histopathologic-cancer-detection/sample_submission.csv", "id,label\n" + "".join(f"{k},0\n" for k in test))
        for k, v in train.items():
            zf.writestr(f"histopathologic-cancer-detection/train/{k}.tif", v)
        for k, v in test.items():
            zf.writestr(f"histopathologic-cancer-detection/test/{k}.tif", v)
    assert run(arc, tmp_path / "out")["train"]["packed"] == 6


@pytest.mark.parametrize(
    "case, words",
    [
        ("no_labels", "no train_labels.csv at the top level"),
        ("bad_header", "expected header 'id,label', found 'image,target'"),
        ("empty_test", "test/ holds no <id>.tif patches"),
        ("no_sample", "sample_submission.csv: missing"),
        ("not_zip", "not a readable zip archive"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(small_set, tmp_path, case, words):
    train, labels, test = small_set
    arc = tmp_path / "bad.zip"
    if case == "no_labels":
        make_archive(arc, train, labels, test, skip=("train_labels.csv",))
    elif case == "bad_header":
        make_archive(arc, train, labels.replace("id,label", "image,target"), test)
    elif case == "empty_test":
        make_archive(arc, train, labels, {}, sample="id,label\n")
    elif case == "no_sample":
        make_archive(arc, train, labels, test, skip=("sample_submission.csv",))
    else:
        arc.write_bytes(b"this is not a zip file at all")
    (tmp_path / "out/packed").mkdir(parents=True)
    (tmp_path / "out/packed/train_x.npy").write_bytes(b"earlier output")
    with pytest.raises(HcdError) as info:
        run(arc, tmp_path / "out")
    msg = str(info.value)
    assert words in msg and str(arc) in msg and "\n" not in msg
    assert (tmp_path / "out/packed/train_x.npy").read_bytes() == b"earlier output", "nothing already produced is lost"


def test_non_tiff_member_is_flagged_and_the_scan_carries_on(small_set, tmp_path):
    train, labels, test = small_set
    train = dict(train)
    train[hexid(2)] = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    run(make_archive(tmp_path / "a.zip", train, labels, test), tmp_path / "out")
    rep = report(tmp_path / "out").set_index("id")
    assert rep.loc[hexid(2), "reason"] == "undecodable" and "PNG" in rep.loc[hexid(2), "detail"]


def test_zip_bomb_member_is_refused_unread(small_set, tmp_path):
    train, labels, test = small_set
    train = dict(train)
    train[hexid(4)] = b"\0" * (9 * 1024 * 1024)  # inflates past the member size limit
    run(make_archive(tmp_path / "a.zip", train, labels, test), tmp_path / "out")
    rep = report(tmp_path / "out").set_index("id")
    assert rep.loc[hexid(4), "reason"] == "undecodable" and "refused" in rep.loc[hexid(4), "detail"]


def test_corrupt_member_fails_its_crc(small_set, tmp_path):
    train, labels, test = small_set
    arc = make_archive(tmp_path / "a.zip", train, labels, test)
    src = ZipSource(arc)
    name, offset, csize, *_ = src.listing().train[hexid(3)]
    data = bytearray(arc.read_bytes())
    start = offset + 30 + len(name)
    data[start + csize // 2] ^= 0xFF
    arc.write_bytes(bytes(data))
    run(arc, tmp_path / "out")
    rep = report(tmp_path / "out").set_index("id")
    assert rep.loc[hexid(3), "reason"] == "undecodable"
