"""CLI: python -m med3d_ext.data {synth,real,preprocess} ... (see --help of each).

Exit status, as ``python -m med3d_ext.train``'s: 0 done; 2 the command cannot run as given
(argparse's usage errors, a bad --spacing/--size/--seed, a dataset path that does not exist or
holds no dataset, a classification folder (labels.csv) given to preprocess, which has nothing
to preprocess, an --out that cannot be used: :class:`~med3d_ext.data.io.DataPathError`);
1 a failure while running (a :class:`~med3d_ext.data.DataError` met in the data: an
unreadable or NaN image, a malformed dataset.json, undeclared labels; a missing optional
package; a disk error); 130 / 143 interrupted (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings

from .. import _signals
from .._args import unwritable_folder


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m med3d_ext.data",
                                description="med3d_ext data tools")
    # (the metavar names the commands in "the following arguments are required", not `cmd`)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{synth,real,preprocess}")
    s = sub.add_parser("synth", help="write synthetic 3DSeg-8 (pretrain/, transfer/, "
                                     "transfer_cls/)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--cases", type=int, default=4, help="cases per pretraining dataset "
                                                        "(default 4)")
    s.add_argument("--size", type=int, default=48, help="in-plane voxels per side (default 48)")
    s.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    s.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier synth output: delete it (its pretrain/, "
                        "transfer/ and transfer_cls/) and write anew; refused for a folder "
                        "that holds anything else (default: a non-empty --out is refused)")
    r = sub.add_parser("real", help="MSD datasets from packaged real volumes (nilearn MNI152; "
                                    "Colin27 if mricron-data is installed)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--cases", type=int, default=6, help="cases per dataset (default 6)")
    r.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    q = sub.add_parser("preprocess", help="preprocess a raw dataset into the cache")
    q.add_argument("dataset", help="raw segmentation dataset folder (MSD, nnU-Net v2 or "
                                    "MedicalNet list), or a folder of them; a classification "
                                    "folder (labels.csv) is refused: classification runs "
                                    "prepare images on the fly and read no cache")
    q.add_argument("--out", default=None, help="cache folder (default: "
                                               "$MED3D_EXT_CACHE or ~/.cache/med3d_ext/...)")
    q.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, max 8;"
                                                             " 0 = in-process)")
    # one value (isotropic) or three (D, H, W), as preprocess() takes and its message says
    q.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="target spacing in mm: one value (isotropic) or three, D H W "
                        "(default: the dataset's median)")
    q.add_argument("--skip-bad", action="store_true",
                   help="skip bad cases with a warning list instead of stopping")
    q.add_argument("--seed", type=_seed, default=0,
                   help="seed of the foreground voxel samples kept per case (default 0)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _seed(v: str) -> int:
    n = int(v)
    if n < 0:  # numpy's generators refuse it, with a message that names no option
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return n


EXIT_FAILURE = 1  # a failure while running (bad data, a disk error)
EXIT_USAGE = 2  # the command cannot run as given (argparse's status for usage errors)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .io import DataError, DataPathError

    t0 = time.perf_counter()
    out = getattr(args, "out", None)
    if out is not None and not out.strip():
        # an unset shell variable ("--out $DIR"): the current folder is never what was meant
        print(f"error: --out is empty; name the {'cache ' if args.cmd == 'preprocess' else ''}"
              "folder to write", file=sys.stderr)
        return 2
    if args.cmd in ("synth", "real") and out and os.path.exists(out) and not os.path.isdir(out):
        print(f"error: --out {out!r} is a file; {args.cmd} writes a folder", file=sys.stderr)
        return 2
    if args.cmd in ("synth", "real"):
        # refuse an unusable --out before generating anything (and without creating folders
        # for a run that another argument may still refuse), naming it and the reason
        why = unwritable_folder(out)
        if why:
            print(f"error: --out {out!r}: {why}", file=sys.stderr)
            return 2
    if args.cmd == "synth":
        why = _synth_target(args)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
    if args.cmd == "real" and os.path.isdir(out) and any(os.scandir(out)):
        # as synth: its datasets would be written beside (or over) what is there
        print(f"error: --out {out!r} is not empty; real writes its datasets into a new or empty "
              "folder", file=sys.stderr)
        return 2
    try:
        if args.cmd == "synth":
            from .synthetic import synth

            r = synth(args.out, cases=args.cases, size=args.size, seed=args.seed)
            print(f"wrote {len(r['pretrain'])} pretraining datasets, {r['transfer']} and "
                  f"{r['transfer_cls']} in {time.perf_counter() - t0:.1f} s")
        elif args.cmd == "real":
            from .real_volumes import real

            for d in real(args.out, cases=args.cases, seed=args.seed):
                print(f"wrote {d}")
        else:
            with _signals.sigterm_as_interrupt():
                for path, out in _preprocess_targets(args.dataset, args.out):
                    _preprocess_one(path, out, args)
    except DataPathError as e:  # a dataset or --out path that cannot be used as given
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ImportError) as e:  # met in the data; an optional package missing
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as e:  # the arguments' checks (--spacing, --workers, --size, --seed)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a disk full or an unwritable file met mid-run (or, from `real`,
        # a nilearn install without its bundled files)
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as e:
        print("interrupted" + ("; run the same command again to continue (the cases already "
                               "preprocessed are reused)" if args.cmd == "preprocess" else ""),
              file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # 130, or 143 after SIGTERM
    return 0


def _synth_target(args) -> str | None:
    """Why synth may not write into --out (None when it may). A non-empty folder is refused:
    synth wrote beside what was there (a second synth with fewer cases left the first one's
    images beside a dataset.json that lists fewer; an unrelated folder got datasets mixed in;
    a dataset that runs trained on was replaced without a word). --overwrite replaces an
    earlier synth output, and only that: it is deleted here, once the other arguments are
    known to be good (a refused --size must not leave the old dataset deleted and no new
    one)."""
    import shutil
    from pathlib import Path

    from .synthetic import SYNTH_ENTRIES, check_synth_args, not_synth_output

    out = Path(args.out)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not args.overwrite:
        shown = sorted(p.name for p in out.iterdir())
        shown = ", ".join(shown[:5]) + (", ..." if len(shown) > 5 else "")
        return (f"--out {args.out!r} is not empty ({shown}); synth writes a new dataset "
                "folder: give a new or empty folder, or --overwrite to replace an earlier "
                "synth output there")
    why = not_synth_output(out)
    if why:
        return (f"--out {args.out!r}: --overwrite replaces only an earlier synth output, and "
                f"{why}; give a new or empty folder")
    try:
        check_synth_args(cases=args.cases, size=args.size, seed=args.seed)
    except (TypeError, ValueError) as e:
        return str(e)
    for name in SYNTH_ENTRIES:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    print(f"--overwrite: removed the earlier synth output in {out}")
    return None


def _preprocess_targets(dataset, out) -> list:
    """(dataset folder, cache folder) pairs. A folder of datasets (synth's ``DIR/pretrain``,
    which ``pretrain --data`` expands the same way) gives each of its datasets; with ``--out
    CACHE`` each goes to the sub-folder that ``--cache CACHE`` makes training look in."""
    from pathlib import Path

    from .io import DataError
    from .layouts import find_datasets
    from .cache import cache_subdir

    try:
        dirs = find_datasets(dataset) if Path(dataset).is_dir() else [dataset]
    except DataError:  # neither: load_dataset says what is wrong with the folder itself
        dirs = [dataset]
    _refuse_classification(dataset, dirs)
    if len(dirs) == 1:
        return [(dirs[0], out)]
    print(f"{dataset}: {len(dirs)} datasets ({', '.join(Path(d).name for d in dirs)})")
    return [(d, None if out is None else cache_subdir(out, d)) for d in dirs]


def _refuse_classification(dataset, dirs) -> None:
    """A classification folder (labels.csv) has nothing to preprocess: classification runs
    (``transfer --task cls``, evaluate and predict with such a run) prepare each image from its
    source file (:func:`~med3d_ext.data.classification_volume`) and never read a cache. The
    segmentation recipe used to run on it and report "N cases cached", a cache nothing
    reads. Refused before any work (exit 2), as a folder that holds no dataset is."""
    from pathlib import Path

    from .io import DataError, DataPathError
    from .layouts import detect_layout

    def is_cls(d):
        try:
            return detect_layout(d) == "classification"
        except DataError:  # not a dataset, or a broken one: loading it says what is wrong
            return False

    why = ("classification runs (python -m med3d_ext.train transfer --task cls, and evaluate "
           "and predict with such a run) prepare each image on the fly from its source file "
           "(RAS, clipped to its own 0.5-99.5 percentiles, z-scored, resized to --patch) and "
           "never read a preprocessing cache, so there is nothing to preprocess")
    cls = [d for d in dirs if is_cls(d)]
    if not cls:
        return
    if len(dirs) == 1:
        raise DataPathError(cls[0], f"a classification folder (labels.csv): {why}; train on it "
                                    f"with python -m med3d_ext.train transfer --task cls "
                                    f"--data {cls[0]}")
    raise DataPathError(dataset, f"holds {len(cls)} classification folder(s) (labels.csv): "
                                 f"{', '.join(Path(d).name for d in cls)}; {why}; preprocess "
                                 "the segmentation datasets one by one")


def _preprocess_one(path, out, args) -> None:
    from .layouts import load_dataset
    from .preprocess import preprocess

    ds = load_dataset(path, skip_bad=args.skip_bad)
    print(ds.summary())
    with warnings.catch_warnings():  # the skipped cases are listed once, below
        warnings.filterwarnings("ignore", message=r".*skipped \d+ bad case")
        pre = preprocess(ds, out, workers=args.workers, skip_bad=args.skip_bad,
                         target_spacing=args.spacing, progress=not args.no_progress,
                         seed=args.seed)
    # one timing per dataset, the throughput line below: this line said "(X s)" too, the
    # call's wall time, beside the processing time there (two different numbers for one run)
    print(f"{len(pre)} cases cached in {pre.dir}; target spacing "
          f"{pre.info['target_spacing']} mm")
    st = pre.stats
    if st["processed"]:
        print(f"preprocessed {st['processed']} case(s) in {st['seconds']:.1f} s: "
              f"{st['processed'] / max(st['seconds'], 1e-9):.2f} cases/s"
              + (f" ({st['workers']} worker processes)" if st.get("workers", 0) > 1
                 else " (in this process)")
              + (f"; {st['reused']} reused from the cache" if st["reused"] else ""))
    elif st["reused"]:
        print(f"all {st['reused']} case(s) reused from the cache (unchanged sources)")
    problems = pre.info.get("problems", [])
    if problems:  # the header training's warning has, then one line per case
        print(f"warning: {pre.dir}: skipped {len(problems)} bad case(s) (--skip-bad):",
              file=sys.stderr)
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
