"""``python -m med3d_ext.data synth --out`` and a folder that is not empty (user audit): a
second synth with fewer cases left the first one's images beside a dataset.json that lists
fewer, wrote datasets into an unrelated folder, and replaced a dataset that runs trained on,
without a word. A non-empty --out is refused; --overwrite replaces an earlier synth output,
and nothing else."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("nibabel")

from med3d_ext.data.__main__ import main  # noqa: E402


def _seed() -> int:
    return int(torch.randint(0, 1000, ()).item())


def _synth(out, cases, seed, *extra) -> int:
    return main(["synth", "--out", str(out), "--cases", str(cases), "--size", "16", "--seed",
                 str(seed), *extra])


def _files(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_synth_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "s"
    assert _synth(out, 2, _seed()) == 0
    before = _files(out)
    capsys.readouterr()
    # a second synth (fewer cases, another seed) into it: refused, nothing written
    assert _synth(out, 1, _seed()) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --out {str(out)!r} is not empty (pretrain, transfer, transfer_cls); "
                   "synth writes a new dataset folder: give a new or empty folder, or "
                   "--overwrite to replace an earlier synth output there"), err
    assert _files(out) == before
    # an unrelated folder: refused, and untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert _synth(mine, 1, _seed()) == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # an empty folder is fine (pytest's tmp folders, a folder made beforehand)
    (tmp_path / "empty").mkdir()
    assert _synth(tmp_path / "empty", 1, _seed()) == 0


def test_synth_overwrite_replaces_an_earlier_synth_output(tmp_path, capsys):
    out, fresh = tmp_path / "s", tmp_path / "fresh"
    seed = _seed()
    assert _synth(out, 2, _seed()) == 0
    kidney = out / "transfer" / "Task11_Kidney"
    assert len(list((kidney / "imagesTr").iterdir())) == 4
    # a refused argument leaves the earlier output as it was (it is deleted only once the
    # arguments are known to be good)
    before = _files(out)
    assert main(["synth", "--out", str(out), "--size", "5", "--overwrite"]) == 2
    assert "size must be an int in [8, 512], got 5" in capsys.readouterr().err
    assert _files(out) == before
    assert _synth(out, 1, seed, "--overwrite") == 0
    assert f"--overwrite: removed the earlier synth output in {out}" in capsys.readouterr().out
    # exactly what a synth into a new folder writes: no stale case beside the new dataset.json
    assert _synth(fresh, 1, seed) == 0
    assert _files(out) == _files(fresh)
    meta = json.loads((kidney / "dataset.json").read_text())
    assert meta["numTraining"] == 2 == len(list((kidney / "imagesTr").iterdir()))


@pytest.mark.parametrize("extra", ["file", "dataset", "cls_file", "foreign_json", "no_json",
                                   "link"])
def test_synth_overwrite_refuses_what_synth_did_not_write(tmp_path, capsys, extra):
    out = tmp_path / "s"
    assert _synth(out, 1, _seed()) == 0
    if extra == "file":  # the user's file beside the datasets
        (out / "README.txt").write_text("mine")
        want = "it also holds README.txt, which synth does not write"
    elif extra == "dataset":  # a dataset of the user's among synth's
        (out / "pretrain" / "Task99_Mine").mkdir()
        want = f"{str(out / 'pretrain' / 'Task99_Mine')!r} is not a dataset synth writes"
    elif extra == "cls_file":
        (out / "transfer_cls" / "extra.csv").write_text("image,label\n")
        want = "also holds extra.csv, which synth does not write"
    elif extra == "foreign_json":  # a dataset under a synth name, not synth's
        js = out / "transfer" / "Task11_Kidney" / "dataset.json"
        js.write_text(json.dumps(dict(json.loads(js.read_text()), reference="my hospital")))
        want = f"{str(js)!r} is not a dataset.json that synth writes"
    elif extra == "no_json":  # only synth's folder names, none of its dataset.json files
        for js in out.rglob("dataset.json"):
            js.unlink()
        want = "it holds no dataset.json that synth writes"
    else:  # a link to someone's folder is never cleared through
        (tmp_path / "elsewhere").mkdir()
        import shutil

        shutil.rmtree(out / "transfer_cls")
        (out / "transfer_cls").symlink_to(tmp_path / "elsewhere")
        (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
        want = "its transfer_cls is a symbolic link, which synth does not write"
    before = _files(out)
    capsys.readouterr()
    assert _synth(out, 1, _seed(), "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {str(out)!r}: --overwrite replaces only an earlier "
                          "synth output, and ") and want in err, err
    assert _files(out) == before
    if extra == "link":
        assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"


def test_synth_help_documents_overwrite(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--overwrite" in out and "earlier synth output" in out
