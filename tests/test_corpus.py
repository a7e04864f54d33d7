"""The bad-input corpus: every hostile or broken archive the issue lists, through ``hcd scan``.

Each case builds a Kaggle-layout zip around one defect and runs the scan stage
exactly as the engines do (``hcd scan ...``: the CLI, its exit code and its
stderr). Each must end in one of three ways, never a traceback:

- ``error``: exit 2 and one line, ``hcd scan: error: <archive>: <problem>``;
  outputs of an earlier run are left exactly as they were;
- ``flag``: the scan carries on; the report has the expected reason for the id
  or member, and every good patch is packed;
- ``ok``: a quirk the stage must accept (BOM, CRLF, a compressed TIFF...); every
  patch is packed, pixel for pixel.

Nothing is ever extracted: after each case the folder holds only the archive
and the stage's outputs. ``CASES`` is the table in the closing note of issue 5.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, bomb_header, encode_patch, hexid, make_archive, patch
from conftest import tiff_bytes as tiff

from hcd.cli import main as hcd
from hcd.pipeline.table import packed_args

BAD = hexid(2)  # the train patch a case damages
GOOD_TRAIN = [hexid(i) for i in range(6)]
TEST_IDS = [hexid(100 + i) for i in range(3)]


def pil(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(patch(2)).save(buf, format=fmt)
    return buf.getvalue()


class Kit:
    """The six-patch set of ``conftest.small_set``, and ways to spoil it."""

    def __init__(self, root: Path) -> None:
        self.arc = root / "in.zip"
        self.train = {pid: encode_patch(patch(i)) for i, pid in enumerate(GOOD_TRAIN)}
        self.test = {pid: encode_patch(patch(100 + i)) for i, pid in enumerate(TEST_IDS)}
        self.labels = "id,label\n" + "".join(f"{pid},{i % 2}\n" for i, pid in enumerate(GOOD_TRAIN))

    def build(self, **kw) -> Path:
        return make_archive(self.arc, self.train, kw.pop("labels", self.labels), self.test, **kw)

    def patch_is(self, data: bytes) -> Path:
        self.train[BAD] = data
        return self.build()

    def label_of_bad_is(self, value: str) -> Path:
        return self.build(labels=self.labels.replace(f"{BAD},0", f"{BAD},{value}"))

    def raw_zip(self, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
        with zipfile.ZipFile(self.arc, "w", zipfile.ZIP_DEFLATED) as zf:
            for info, data in members:
                zf.writestr(info, data)
        return self.arc

    def with_members(self, extra: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
        members: list[tuple[zipfile.ZipInfo | str, bytes]] = [("train_labels.csv", self.labels.encode()), ("sample_submission.csv", ("id,label\n" + "".join(f"{t},0\n" for t in TEST_IDS)).encode())]
        members += [(f"train/{k}.tif", v) for k, v in self.train.items()] + [(f"test/{k}.tif", v) for k, v in self.test.items()]
        return self.raw_zip(members + extra)


def symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix
    info.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK
    return info


def corrupt_central_directory(k: Kit) -> Path:
    arc = k.build()
    data = bytearray(arc.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd : cd + 46] = b"\xff" * 46  # the last central-directory record, garbled
    arc.write_bytes(bytes(data))
    return arc


def corrupt_member_data(k: Kit) -> Path:
    arc = k.build()
    data = bytearray(arc.read_bytes())
    name = f"train/{BAD}.tif".encode()
    start = data.find(name) + len(name)  # the local header's name; the deflated data follows
    data[start + 200] ^= 0xFF  # inside the deflated patch: its CRC no longer matches
    arc.write_bytes(bytes(data))
    return arc


def lying_zip_bomb(k: Kit) -> Path:
    """A member that declares 27,648 bytes but inflates to 64 MB: the inflater stops at the limit."""
    arc = k.patch_is(b"\0" * (64 * 1024 * 1024))
    data = bytearray(arc.read_bytes())
    name = f"train/{BAD}.tif".encode()
    local = 0
    while True:  # the member's local header, then its central-directory record
        local = data.find(b"PK\x03\x04", local)
        if data[local + 30 : local + 30 + len(name)] == name:
            break
        local += 4
    struct.pack_into("<I", data, local + 22, 96 * 96 * 3)
    cd = data.find(b"PK\x01\x02")
    while data[cd + 46 : cd + 46 + len(name)] != name:
        cd = data.find(b"PK\x01\x02", cd + 4)
    struct.pack_into("<I", data, cd + 24, 96 * 96 * 3)
    arc.write_bytes(bytes(data))
    return arc


def nested(k: Kit) -> Path:
    with zipfile.ZipFile(k.arc, "w", zipfile.ZIP_DEFLATED) as zf:
        top = "histopathologic-cancer-detection/"
        zf.writestr(top + "train_labels.csv", k.labels)
        zf.writestr(top + "sample_submission.csv", "id,label\n" + "".join(f"{t},0\n" for t in TEST_IDS))
        for split, members in (("train", k.train), ("test", k.test)):
            for pid, data in members.items():
                zf.writestr(f"{top}{split}/{pid}.tif", data)
    return k.arc


Case = tuple[str, Callable[[Kit], Path], str, tuple]
# (name, build, outcome, expectation): error -> (words,); flag -> (split, id or member, reason, words); ok -> ()
CASES: list[Case] = [
    # ---- patches
    ("truncated TIFF", lambda k: k.patch_is(encode_patch(patch(2))[:5000]), "flag", ("train", BAD, "undecodable", "truncated")),
    ("zero-byte file", lambda k: k.patch_is(b""), "flag", ("train", BAD, "undecodable", "empty")),
    ("PNG renamed .tif", lambda k: k.patch_is(pil("PNG")), "flag", ("train", BAD, "undecodable", "PNG")),
    ("JPEG renamed .tif", lambda k: k.patch_is(pil("JPEG")), "flag", ("train", BAD, "undecodable", "JPEG")),
    ("16-bit TIFF", lambda k: k.patch_is(tiff(patch(2).astype(np.uint16) * 200, photometric="rgb")), "flag", ("train", BAD, "wrong_format", "uint16")),
    ("grayscale TIFF", lambda k: k.patch_is(tiff(patch(2)[..., 0])), "flag", ("train", BAD, "wrong_format", "96x96 uint8")),
    ("RGBA TIFF", lambda k: k.patch_is(tiff(np.dstack([patch(2), patch(2)[..., :1]]), photometric="rgb", extrasamples=[2])), "flag", ("train", BAD, "wrong_format", "96x96x4")),
    ("95x96 TIFF", lambda k: k.patch_is(tiff(patch(2)[:, :95], photometric="rgb")), "flag", ("train", BAD, "wrong_format", "96x95x3")),
    ("decompression bomb header (100,000 x 100,000 px)", lambda k: k.patch_is(bomb_header()), "flag", ("train", BAD, "wrong_format", "refused unread")),
    ("deflate-compressed TIFF (tifffile reads it)", lambda k: k.patch_is(tiff(patch(2), photometric="rgb", compression="zlib")), "ok", ()),
    ("corrupt test patch", lambda k: (k.test.__setitem__(TEST_IDS[1], b"II*\x00garbage"), k.build())[1], "flag", ("test", TEST_IDS[1], "undecodable", "packed as zeros")),
    # ---- train_labels.csv
    ("labels with a UTF-8 BOM", lambda k: k.build(labels=b"\xef\xbb\xbf" + k.labels.encode()), "ok", ()),
    ("labels with CRLF line ends", lambda k: k.build(labels=k.labels.replace("\n", "\r\n")), "ok", ()),
    ("labels with extra columns", lambda k: k.build(labels=k.labels.replace("id,label\n", "id,label,slide\n").replace(",0\n", ",0,s1\n").replace(",1\n", ",1,s2\n")), "ok", ()),
    ("labels without a header", lambda k: k.build(labels=k.labels.replace("id,label\n", "")), "error", ("train_labels.csv", "expected header 'id,label'")),
    ("labels not UTF-8", lambda k: k.build(labels=b"id,label\n\xff\xfe\x00bad,1\n"), "error", ("train_labels.csv", "not UTF-8")),
    ("duplicate id, same label", lambda k: k.build(labels=k.labels + f"{BAD},0\n"), "flag", ("train", BAD, "duplicate_id", "first kept")),
    ("duplicate id, conflicting labels", lambda k: k.build(labels=k.labels + f"{BAD},1\n"), "flag", ("train", BAD, "duplicate_id", "conflicting")),
    ("non-hex id", lambda k: k.build(labels=k.labels + "zz" * 20 + ",1\n"), "flag", ("train", "zz" * 20, "bad_id", "40 lower-case hex")),
    ("label 2", lambda k: k.label_of_bad_is("2"), "flag", ("train", BAD, "bad_label", "'2'")),
    ("label -1", lambda k: k.label_of_bad_is("-1"), "flag", ("train", BAD, "bad_label", "'-1'")),
    ("label empty", lambda k: k.label_of_bad_is(""), "flag", ("train", BAD, "bad_label", "is not 0 or 1")),
    ('label "yes"', lambda k: k.label_of_bad_is("yes"), "flag", ("train", BAD, "bad_label", "'yes'")),
    ("labelled id without an image", lambda k: k.build(labels=k.labels + f"{hexid(77)},1\n"), "flag", ("train", hexid(77), "missing_image", "no train/<id>.tif")),
    ("image without a label", lambda k: (k.train.__setitem__(hexid(78), encode_patch(patch(78))), k.build())[1], "flag", ("train", hexid(78), "unlabelled", "without a train_labels.csv row")),
    # ---- sample_submission.csv
    ("sample_submission id without a test image", lambda k: k.build(sample="id,label\n" + "".join(f"{t},0\n" for t in [*TEST_IDS, hexid(199)])), "flag", ("test", hexid(199), "missing_image", "packed as zeros")),
    ("no sample_submission.csv", lambda k: k.build(skip=("sample_submission.csv",)), "error", ("sample_submission.csv: missing",)),
    # ---- the archive
    ("zip-slip member train/../../evil.tif", lambda k: k.with_members([("train/../../evil.tif", encode_patch(patch(9)))]), "flag", ("train", "train/../../evil.tif", "unexpected_file", "unsafe name")),
    ("zip-slip member ../../evil.sh", lambda k: k.with_members([("../../evil.sh", b"#!/bin/sh\ntouch pwned\n")]), "flag", ("archive", "../../evil.sh", "unexpected_file", "unsafe name")),
    ("absolute member /tmp/hcd-evil.tif", lambda k: k.with_members([("/tmp/hcd-evil.tif", encode_patch(patch(9)))]), "flag", ("archive", "/tmp/hcd-evil.tif", "unexpected_file", "unsafe name")),
    ("symlink member train/<id>.tif -> /etc/passwd", lambda k: k.with_members([(symlink_member(f"train/{hexid(79)}.tif", "/etc/passwd"), b"/etc/passwd")]), "flag", ("train", f"train/{hexid(79)}.tif", "unexpected_file", "symbolic link")),
    ("nested top folder", nested, "ok", ()),
    ("zip bomb member (inflates past 8 MB)", lambda k: k.patch_is(b"\0" * (64 * 1024 * 1024)), "flag", ("train", BAD, "undecodable", "refused")),
    ("zip bomb member that lies about its size", lying_zip_bomb, "flag", ("train", BAD, "undecodable", "inflates past the size limit")),
    ("member fails its CRC", corrupt_member_data, "flag", ("train", BAD, "undecodable", "CRC")),
    ("corrupt central directory", corrupt_central_directory, "error", ("not a readable zip archive",)),
    ("archive cut in half", lambda k: (k.build(), k.arc.write_bytes(k.arc.read_bytes()[: k.arc.stat().st_size // 2]), k.arc)[2], "error", ("not a readable zip archive",)),
    ("empty archive", lambda k: k.raw_zip([]), "error", ("no train_labels.csv at the top level",)),
    ("not a zip at all", lambda k: (k.arc.write_bytes(b"<html>404 Not Found</html>"), k.arc)[1], "error", ("not a readable zip archive",)),
]


def test_the_corpus_holds_every_case_the_issue_lists():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, build, outcome, expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, monkeypatch, capsys, name, build, outcome, expect):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    earlier = {work / "data/packed/train_x.npy": b"earlier output", work / "data/scan/report.csv": b"split,id,reason,detail,dropped\n"}
    for path, data in earlier.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    arc = build(Kit(tmp_path))
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    argv = ["scan", str(arc), "--report", "data/scan/report.csv", "--summary", "metrics/scan.json", *packed_args("data/packed"), "--workers", "1"]
    code = 0
    try:
        hcd(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err

    if outcome == "error":
        assert code == 2, err
        assert err.count("\n") == 0 and err.startswith(f"hcd scan: error: {arc}"), err
        for words in expect:
            assert words in err, err
        assert {p: p.read_bytes() for p in earlier} == earlier, "an earlier output was touched"
    else:
        assert code == 0, err
        index = pd.read_csv(work / "data/packed/train_index.csv", dtype={"id": str})
        packed = np.load(work / "data/packed/train_x.npy")
        report = pd.read_csv(work / "data/scan/report.csv", dtype={"id": str}, keep_default_na=False)
        if outcome == "ok":
            assert report.empty, report.to_string()
            assert sorted(index["id"]) == GOOD_TRAIN
            for row, pid in zip(index["row"], index["id"]):
                np.testing.assert_array_equal(packed[row], patch(GOOD_TRAIN.index(pid)))
        else:
            split, key, reason, words = expect
            hit = report[(report["split"] == split) & (report["id"] == key)]
            assert len(hit) == 1, report.to_string()
            assert hit["reason"].iloc[0] == reason and words in hit["detail"].iloc[0], hit.to_string()
            good = [pid for pid in GOOD_TRAIN if not (split == "train" and pid == key and reason in ("undecodable", "wrong_format", "bad_label") or "conflicting" in words and pid == key)]
            assert set(good) <= set(index["id"]), "a good patch was lost"
            for row, pid in zip(index["row"], index["id"]):
                if pid in GOOD_TRAIN and pid != key:
                    np.testing.assert_array_equal(packed[row], patch(GOOD_TRAIN.index(pid)))
        assert len(pd.read_csv(work / "data/packed/test_index.csv")) >= len(TEST_IDS)
    # nothing extracted: the folders hold the archive and the stage's outputs, nothing else
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.iterdir()) == ["in.zip", "work"]
    hcd_state = {".hcd/runner.json", ".hcd/runner.lock"}  # which runner holds the checkout (hcd.pipeline.runlock): no patch data
    assert {str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()} - hcd_state <= {"params.yaml", "data/packed/train_x.npy", "data/packed/train_index.csv", "data/packed/test_x.npy", "data/packed/test_index.csv", "data/scan/report.csv", "metrics/scan.json"}
    assert not Path("/tmp/hcd-evil.tif").exists()
