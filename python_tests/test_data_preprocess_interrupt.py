"""Ctrl-C / SIGTERM during ``python -m med3d_ext.data preprocess --workers 2``: one line, exit
130 / 143, no worker left behind, no temporary left in the cache, and a rerun preprocesses
only the cases that were not finished (a cache entry is trusted only when it is complete)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")

from med3d_ext.data import preprocess  # noqa: E402
from python_tests._datahelp import make_msd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 6


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env.pop("MED3D_EXT_TEST_CASE_DELAY", None)
    env.update(extra)
    return env


def _cli(root, cache, *extra) -> list[str]:
    return [sys.executable, "-m", "med3d_ext.data", "preprocess", str(root), "--out", str(cache),
            "--no-progress", *map(str, extra)]


def _alive_in_session(sid: int) -> list[int]:
    """Processes of session ``sid`` still running (zombies excluded)."""
    alive = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session
            alive.append(int(d.name))
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["ctrl_c_to_the_group", "sigterm_to_the_parent"])
def test_interrupted_parallel_preprocess_stops_cleanly_and_resumes(tmp_path, how):
    root = make_msd(tmp_path / "ds", n=N)
    cache = tmp_path / "cache"
    # each case waits 2 s between its image and its metadata: the signal lands mid-entry
    p = subprocess.Popen(_cli(root, cache, "--workers", 2),
                         env=_env(MED3D_EXT_TEST_CASE_DELAY="2"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and \
                not list((cache / "cases").glob("*.image.npy")):
            time.sleep(0.05)
        time.sleep(0.3)
        assert p.poll() is None, "preprocessing ended before it could be interrupted"
        if how == "ctrl_c_to_the_group":  # what a terminal does: every process gets it
            os.killpg(p.pid, signal.SIGINT)
        else:  # a scheduler or `kill` ending the job
            p.send_signal(signal.SIGTERM)
        t0 = time.time()
        out, err = p.communicate(timeout=60)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    want = signal.SIGINT if how == "ctrl_c_to_the_group" else signal.SIGTERM
    assert p.returncode == 128 + want, err
    assert err.strip().startswith("interrupted") and len(err.strip().splitlines()) == 1, err
    # it stopped at once, not after the remaining cases (4 s or more: 2 workers, 2 s a case)
    assert took < 3, took
    time.sleep(0.2)
    assert _alive_in_session(p.pid) == [], "worker processes left behind"
    entries = cache / "cases"
    assert not [f.name for f in [*cache.iterdir(), *entries.iterdir()] if ".tmp" in f.name]

    done = {f.name[:-5] for f in entries.glob("c*.json")}
    started = {f.name.split(".")[0] for f in entries.glob("*.image.npy")}
    assert started - done, "no case was cut off in the middle"  # a half-written entry
    kept = {f.name: f.stat().st_mtime_ns for f in entries.iterdir()
            if f.name.split(".")[0] in done}

    r = subprocess.run(_cli(root, cache, "--workers", 0), env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"preprocessed {N - len(done)} case(s)" in r.stdout, r.stdout
    if done:
        assert f"{len(done)} reused from the cache" in r.stdout, r.stdout
    # the finished entries were not rewritten
    assert {n: (entries / n).stat().st_mtime_ns for n in kept} == kept
    ref = preprocess(root, tmp_path / "ref", progress=False, workers=0)
    pre = preprocess(root, cache, progress=False, workers=0)
    assert pre.stats["processed"] == 0 and pre.names == ref.names
    for i in range(N):
        np.testing.assert_array_equal(pre.image(i), ref.image(i))
        np.testing.assert_array_equal(pre.label(i), ref.label(i))


@pytest.mark.parametrize("damage", ["missing_label", "truncated_image", "torn_locs"])
def test_an_incomplete_cache_entry_is_redone_not_trusted(tmp_path, damage):
    root = make_msd(tmp_path / "ds", n=3)
    cache = tmp_path / "cache"
    ref = preprocess(root, cache, progress=False, workers=0)
    if damage == "missing_label":
        (cache / "cases" / "c1.label.npy").unlink()
    elif damage == "truncated_image":
        raw = (cache / "cases" / "c1.image.npy").read_bytes()
        (cache / "cases" / "c1.image.npy").write_bytes(raw[: len(raw) - 40])
    else:
        raw = (cache / "cases" / "c1.locs.npz").read_bytes()
        (cache / "cases" / "c1.locs.npz").write_bytes(raw[: len(raw) // 2])
    stamp = {n: (cache / "cases" / f"{n}.image.npy").stat().st_mtime_ns for n in ("c0", "c2")}
    pre = preprocess(root, cache, progress=False, workers=0)
    assert pre.stats == {"processed": 1, "seconds": pre.stats["seconds"], "reused": 2,
                         "workers": 0}
    assert {n: (cache / "cases" / f"{n}.image.npy").stat().st_mtime_ns for n in ("c0", "c2")} == stamp
    i = pre.names.index("c1")
    np.testing.assert_array_equal(pre.image(i), ref.image(i))
    np.testing.assert_array_equal(pre.label(i), ref.label(i))
    assert pre.meta(i)["norm"] == ref.meta(i)["norm"]


def test_in_process_preprocess_puts_the_sigterm_handler_back(tmp_path):
    # main() runs in-process too (tests, notebooks): its SIGTERM handler once stayed installed
    # afterwards, and changed how every later SIGTERM in the process was handled
    from med3d_ext.data.__main__ import main

    root = make_msd(tmp_path / "ds", n=2)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["preprocess", str(root), "--out", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
