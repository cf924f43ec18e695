"""``python -m med3d_ext.data preprocess`` says its timing once per dataset: the "N cases cached
in DIR (X s)" line gave the call's wall time beside the throughput line's processing time
("preprocessed N case(s) in Y s: Z cases/s"), two durations of one run."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("nibabel")

from med3d_ext.data.__main__ import main  # noqa: E402

from python_tests._datahelp import make_msd  # noqa: E402

_DURATION = re.compile(r"\b\d+(\.\d+)? s\b")


def test_preprocess_prints_one_timing(tmp_path, capsys):
    root = make_msd(tmp_path / "ds", n=2)
    args = ["preprocess", str(root), "--out", str(tmp_path / "c"), "--workers", "0",
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    timed = [line for line in out if _DURATION.search(line)]
    assert len(timed) == 1, out
    assert re.match(r"preprocessed 2 case\(s\) in [\d.]+ s: [\d.]+ cases/s", timed[0]), timed
    assert any(line.startswith(f"2 cases cached in {tmp_path / 'c'}; target spacing")
               for line in out), out
    # a rerun reuses every case: no processing time to give
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert not [line for line in out if _DURATION.search(line)], out
    assert "all 2 case(s) reused from the cache (unchanged sources)" in out


def test_folder_of_datasets_one_timing_each(tmp_path, capsys):
    for name in ("A", "B"):
        make_msd(tmp_path / "sets" / name, n=1)
    assert main(["preprocess", str(tmp_path / "sets"), "--out", str(tmp_path / "c"),
                 "--workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if _DURATION.search(line)]) == 2, out
