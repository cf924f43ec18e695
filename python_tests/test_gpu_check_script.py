"""benchmarks/gpu_check.sh, the one script a (rare, short) GPU session runs, end to end on the
CPU: a bug in it would waste the whole session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import common


def test_gpu_check_script_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh end to end on the CPU (BENCH_DEVICE=cpu) with a stand-in python
    whose `pip install` does nothing and whose pytest runs one small CUDA-marked test: the stages
    run in order, the summary and one results file are written, the exit code is 0."""
    repo = Path(__file__).resolve().parents[1]
    tests = tmp_path / "cuda_tests"
    tests.mkdir()
    (tests / "test_one.py").write_text("import pytest\n\n@pytest.mark.cuda\ndef test_one():\n    assert 1\n")
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = pip ]; then exit 0; fi
if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = pytest ]; then
  shift 2; a=(); for x in "$@"; do [ "$x" = python_tests ] && x={tests}; a+=("$x"); done
  exec {sys.executable} -m pytest "${{a[@]}}"
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    # a prebuilt wheel (benchmarks/gpu_prebuild.sh) of this tree's sources: it cannot pass its
    # CUDA smoke test here, so the script must fall back to the source build
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    (prebuilt / "med3d_ext-0.1.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    src_hash = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_prebuild.sh"), "--hash"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert len(src_hash) == 16
    (prebuilt / "BUILD_INFO").write_text(f"source_hash={src_hash}\ngit=abc1234\n")
    env = dict(os.environ, OUT=str(out), PYTHON=str(fake), BENCH_DEVICE="cpu", THROUGHPUT="0",
               GIT_COMMIT="abc1234", OMP_NUM_THREADS="1", PREBUILT=str(prebuilt))
    p = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "bn_stats"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    build_log = (out / "logs" / "build.log").read_text()
    assert f"source_hash={src_hash}" in build_log and "prebuilt wheel:" in build_log, build_log[-2000:]
    assert "| build | ok (built from source)" in summary, summary
    for stage, status in [("build", "ok"), ("tests", "ok; passed 1 failed 0"), ("targets", "ok"), ("profile", "ok"),
                          ("kernels", "skipped (areas given"), ("throughput", "skipped (THROUGHPUT=0)"),
                          ("study", "skipped (not in ORDER)"), ("compile", "skipped (not in ORDER)"),
                          ("ncu", "skipped (not in ORDER)"), ("memory", "skipped (not in ORDER)")]:
        assert f"| {stage} | {status}" in summary, (stage, summary)
    data = json.loads((out / "bench" / "results.json").read_text())
    assert data["env"]["git_commit"] and {r["area"] for r in data["rows"]} == {"bn_stats"}
    prof = json.loads((out / "bench_profile" / "results.json").read_text())
    assert prof["rows"] and all(r["status"] == common.PROFILED for r in prof["rows"])
    tail = p.stdout.strip().splitlines()
    assert any(line.startswith("  bn_stats/") and "x vs eager torch.var_mean" in line for line in tail[-6:])
    assert any(line.startswith("  profile bn_stats/") for line in tail[-4:])
    assert (out / "gpu_check.tar.gz").stat().st_size > 0


def test_ncu_summary_condenses_the_details_page(tmp_path, capsys):
    """benchmarks.ncu_kernels summary: one table row per profiled kernel (in profile order), its
    name without namespaces or parameters, and the metrics of the details page it was given."""
    from benchmarks import ncu_kernels

    cols = ["ID", "Kernel Name", "Block Size", "Grid Size", "Section Name", "Metric Name",
            "Metric Unit", "Metric Value"]
    k1 = "void med3d_ext::(anonymous namespace)::partial_kernel<float, 8>(med3d_ext::HeadTable, float*)"
    k2 = "void med3d_ext::rs::(anonymous namespace)::pair_kernel<float, unsigned char, float, int, unsigned int>(int)"
    rows = [["0", k1, "(256, 1, 1)", "(512, 1, 1)", "GPU Speed Of Light Throughput", "Duration", "us", "23.46"],
            ["0", k1, "(256, 1, 1)", "(512, 1, 1)", "Occupancy", "Achieved Occupancy", "%", "24.1"],
            ["0", k1, "(256, 1, 1)", "(512, 1, 1)", "Launch Statistics", "Registers Per Thread", "register/thread", "86"],
            ["1", k2, "(256, 1, 1)", "(8448, 1, 1)", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "11.7"]]
    path = tmp_path / "details.csv"
    with open(path, "w", newline="") as f:
        import csv
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(cols)
        w.writerows(rows)
    ncu_kernels.summary(str(path))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| kernel | grid | block | time |"), lines
    first, second = (line.split(" | ") for line in lines[2:])
    assert first[0] == "| partial_kernel<float, 8>" and first[1] == "(512, 1, 1)" and first[3] == "23.46 us"
    assert "24.1" in first and "86" in first
    assert second[0] == "| pair_kernel<float, unsigned char, float, int, unsigned int>" and "11.7" in second


def test_prebuilt_source_hash_follows_the_extension_sources(tmp_path):
    """gpu_prebuild.sh --hash (what gpu_check.sh compares with a prebuilt wheel's BUILD_INFO)
    changes with any compiled source or build file, and not with Python sources: a stale wheel
    is never used, a Python-only change keeps the wheel."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    for rel in ("csrc", "CMakeLists.txt", "pyproject.toml", "med3d_ext/_build_config.py.in",
                "med3d_ext/ops/seg_loss.py", "benchmarks/gpu_prebuild.sh"):
        src, dst = repo / rel, tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)

    def h():
        return subprocess.run(["bash", str(tree / "benchmarks" / "gpu_prebuild.sh"), "--hash"],
                              capture_output=True, text=True, check=True).stdout.strip()
    base = h()
    assert len(base) == 16 and base == subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_prebuild.sh"), "--hash"],
        capture_output=True, text=True, check=True).stdout.strip()  # the same files, the same hash
    (tree / "med3d_ext/ops/seg_loss.py").write_text("# a Python-only change\n")
    assert h() == base
    header = next((tree / "csrc").rglob("*.h"))
    header.write_text(header.read_text() + "\n// changed\n")
    assert h() != base
    header.write_text(header.read_text().replace("\n// changed\n", ""))
    assert h() == base
    (tree / "csrc" / "new_kernel.cu").write_text("// a new file\n")
    assert h() != base
