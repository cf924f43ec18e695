"""Convergence study: does Med3D pretraining make transfer converge faster and better?

``python -m benchmarks.convergence_study [--quick] [--seeds 0 1 2] [--device cpu|cuda]
[--out DIR] [--medicalnet PATH] [--runs DIR]``

1. generate (once, cached) the synthetic 3DSeg-8 of ``med3d_ext.data.synthetic``;
2. pretrain one ResNet-10 on the eight domains (one head each), **shared by all seeds**
   (the pretraining seed is the first of ``--seeds``);
3. for every seed, transfer to the held-out task (synthetic CT kidney + tumour) with the
   same budget (steps, batch, patch, optimizer, schedule) from scratch, from our pretrained
   encoder and, with ``--medicalnet PATH``, from MedicalNet-layout weights;
4. record validation Dice (sliding window over the held-out cases) against step, and report
   the final Dice and the steps each arm needs to reach the from-scratch arm's final Dice.

Writes ``convergence.json``, ``convergence.md`` and, when matplotlib is installed (the
``bench`` extra), ``convergence.png`` (mean Dice against step with a min-max band across seeds)
into ``--out``. Training goes through ``med3d_ext.train`` (run_pretrain / run_transfer), the
same code path as ``python -m med3d_ext.train``.

``run(ctx)`` is the ``convergence`` area of ``python -m benchmarks``: a small study (two seeds
in quick mode) whose rows carry the Dice and steps-to-target of each arm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from med3d_ext.train.demo import steps_to_target, val_curve  # noqa: E402  (shared with the demo)

SCRATCH, OURS, MEDICALNET = "from scratch", "Med3D (synthetic 3DSeg-8)", "MedicalNet weights"
WITH_REAL = "Med3D (synthetic 3DSeg-8 + real MR volumes)"


# ----------------------------------------------------------------------------- sizes


def study_sizes(gpu: bool, quick: bool, cases=None, pretrain_steps=None,
                transfer_steps=None) -> dict:
    """The demo's budgets (``med3d_ext.train.demo.demo_sizes``): transfer validates ``evals``
    times, ``every`` steps apart (the Dice curve's resolution). Quick mode keeps its own tiny
    sizes with a few more validations, so the smoke test still draws a curve.

    cases, pretrain_steps, transfer_steps: a longer or larger study than the demo's (cases per
    synthetic dataset; pretraining steps, a multiple of the demo's epoch; transfer steps per arm,
    a multiple of the validation interval ``every``)."""
    from med3d_ext.train.demo import demo_sizes

    d = demo_sizes(gpu, quick)
    sz = dict(d, every=d["tr_steps"], evals=d["tr_epochs"], val_fraction=0.25)
    if quick:
        sz.update(pre_epochs=1, pre_steps=12, every=4, evals=3)
    for name, v in (("--cases", cases), ("--pretrain-steps", pretrain_steps),
                    ("--transfer-steps", transfer_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if cases is not None:
        if cases < 4:  # a quarter held out for validation, and at least 3 to train on
            raise ValueError(f"--cases must be at least 4, got {cases}")
        sz["cases"] = cases
    if pretrain_steps is not None:
        if pretrain_steps % sz["pre_steps"]:
            raise ValueError(f"--pretrain-steps must be a multiple of {sz['pre_steps']} (the "
                             f"pretraining epoch), got {pretrain_steps}")
        sz["pre_epochs"] = pretrain_steps // sz["pre_steps"]
    if transfer_steps is not None:
        if transfer_steps % sz["every"]:
            raise ValueError(f"--transfer-steps must be a multiple of {sz['every']} (the "
                             f"validation interval), got {transfer_steps}")
        sz["evals"] = transfer_steps // sz["every"]
    return sz


# ----------------------------------------------------------------------------- analysis


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return 0.0 if xs else float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(curves: dict) -> dict:
    """``curves[arm][seed] = {"steps": [...], "dice": [...]}`` (the same steps for every run)
    -> per-arm summary.

    The target is the from-scratch arm's final Dice (mean over seeds). For every arm:
    final Dice (mean, std, min, max over seeds), the mean curve with its min/max band, the
    first step at which the *mean* curve reaches the target, per-seed steps to the target
    (against that seed's own from-scratch final Dice), and the speed-up = scratch's steps /
    the arm's steps on the mean curves (None when the arm never reaches the target).
    """
    if SCRATCH not in curves:
        raise ValueError(f"summarize needs a {SCRATCH!r} arm, got {sorted(curves)}")
    scratch_final = {s: c["dice"][-1] for s, c in curves[SCRATCH].items()}
    # summed in the seeds' sorted order, as the mean curves below: in the given order (--seeds
    # 2 0 1) the target could differ from scratch's own mean final Dice in the last bit, and
    # scratch then "never reached" its own target
    target = _mean([scratch_final[s] for s in sorted(scratch_final)])
    out = {"target": target, "target_rule": "mean final validation Dice of the from-scratch arm",
           "arms": {}}
    for arm, by_seed in curves.items():
        seeds = sorted(by_seed)
        steps = by_seed[seeds[0]]["steps"]
        for s in seeds:
            if by_seed[s]["steps"] != steps:
                raise ValueError(f"{arm}: seed {s} was validated at other steps "
                                 f"({by_seed[s]['steps']} vs {steps})")
        cols = list(zip(*(by_seed[s]["dice"] for s in seeds)))
        mean = [_mean(list(c)) for c in cols]
        finals = [by_seed[s]["dice"][-1] for s in seeds]
        per_seed = {str(s): steps_to_target(steps, by_seed[s]["dice"], scratch_final.get(s, target))
                    for s in seeds}
        out["arms"][arm] = {
            # epochs: metrics.jsonl's 1-based number of the epoch each validation closed
            "seeds": seeds, "steps": steps, "epochs": by_seed[seeds[0]].get("epochs"),
            "mean": mean,
            "min": [min(c) for c in cols], "max": [max(c) for c in cols],
            "final_mean": _mean(finals), "final_std": _std(finals),
            "final_min": min(finals), "final_max": max(finals), "final": finals,
            "best_mean": _mean([max(by_seed[s]["dice"]) for s in seeds]),
            "steps_to_target": steps_to_target(steps, mean, target),
            "steps_to_target_per_seed": per_seed,
        }
    base = out["arms"][SCRATCH]["steps_to_target"]
    for arm, a in out["arms"].items():
        st = a["steps_to_target"]
        a["speedup_vs_scratch"] = (base / st) if (base and st) else None
        a["dice_gain_vs_scratch"] = a["final_mean"] - out["arms"][SCRATCH]["final_mean"]
    return out


# ----------------------------------------------------------------------------- study


def _quiet(*a, **k):
    pass


def run_study(out, *, seeds=(0, 1, 2), device="auto", quick=False, medicalnet=None,
              runs=None, threads=None, head_lr=1e-3, with_real=False, cases=None,
              pretrain_steps=None, transfer_steps=None, log=print) -> dict:
    """The whole study; returns the summary dict (also written as JSON + markdown + PNG).

    threads: torch CPU threads; default torch's own (all cores). On a machine shared with
    other jobs pass 1: OpenMP's spinning barriers make 2 threads 5-100x slower than 1 there.
    head_lr: learning rate of the new head in the pretrained arms (their encoder: 1e-3; from
    scratch every parameter uses 1e-3).
    with_real: one more arm, pretrained on the eight synthetic domains plus the packaged real
    volumes (``med3d_ext.data.real``: nilearn's MNI152 tissue task, Colin27 when installed) with
    the same pretraining budget, so the comparison says whether real MR data helps the
    (CT) transfer task.
    cases, pretrain_steps, transfer_steps: override the demo's sizes (:func:`study_sizes`).
    """
    from med3d_ext.train import config as C
    from med3d_ext.train.cli import run_pretrain, run_transfer
    from med3d_ext.train.demo import build_once, demo_data, demo_recipe
    from med3d_ext.train.distributed import resolve_device

    # every argument is checked before anything is generated or trained: a mistake found
    # after the pretraining cost its minutes (or, on a CPU, most of an hour)
    if not seeds:
        raise ValueError("--seeds: need at least one seed")
    if len(set(seeds)) != len(seeds) or any(not isinstance(k, int) or k < 0 for k in seeds):
        raise ValueError(f"--seeds: distinct non-negative integers, got {list(seeds)}")
    if not (isinstance(head_lr, (int, float)) and math.isfinite(head_lr) and head_lr > 0):
        raise ValueError(f"--head-lr: a positive learning rate, got {head_lr}")
    study_sizes(False, quick, cases, pretrain_steps, transfer_steps)
    mn_arch = None
    if medicalnet is not None:
        if Path(medicalnet).is_dir():
            raise ValueError(f"--medicalnet {str(medicalnet)!r} is a folder; name the weights "
                             "file in it")
        if not Path(medicalnet).is_file():
            raise FileNotFoundError(f"--medicalnet {str(medicalnet)!r}: no such file")
        from med3d_ext.models import infer_medicalnet_depth, load_medicalnet_weights, resnet3d

        # read and checked (keys, shapes, NaN/Inf) before any training: the transfer arm
        # would find a corrupted file only after the pretraining and two other arms
        mn_arch = infer_medicalnet_depth(medicalnet)
        load_medicalnet_weights(resnet3d(mn_arch[0], 2, mn_arch[1]), medicalnet)
    t_all = time.perf_counter()
    dev = resolve_device(device)
    sz = study_sizes(dev.type == "cuda", quick, cases, pretrain_steps, transfer_steps)
    if threads is None:
        threads = 0  # torch's default (all cores); pass 1 on a machine shared with other jobs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if runs is None:  # checkpoints are tens of MB each: not results
        tmp = tempfile.TemporaryDirectory(prefix="m3d-convergence-")
        runs = tmp.name
    runs = Path(runs)
    try:
        t0 = time.perf_counter()
        d = demo_data(sz["cases"], sz["size"], 0, log)
        t_data = time.perf_counter() - t0
        # the demo's recipe (AdamW, loss on the patch grid, ...), validation every `every` steps
        common = dict(demo_recipe(dev, sz, d["root"] / "cache"), progress=False,
                      log_every=sz["every"], threads=threads)
        log(f"pretraining ResNet-10 on the 8 synthetic domains ({sz['pre_epochs'] * sz['pre_steps']} "
            f"steps, seed {seeds[0]}, shared by all seeds)")
        pre = run_pretrain(C.resolve("pretrain", dict(
            common, seed=seeds[0], data=[str(d["pretrain"])], out=str(runs / "pretrain"),
            depth=10, epochs=sz["pre_epochs"], steps=sz["pre_steps"], val_fraction=0.25,
            val_cases=1, lr=1e-3)), log=_quiet)
        log(f"  pretraining: {pre['time_s']:.0f} s, validation Dice {pre['best_score']:.3f}")
        arms = [(SCRATCH, {"from_scratch": True, "depth": 10, "head_lr": 1e-3})]
        arms.append((OURS, {"pretrained": str(runs / "pretrain" / "last.pt"), "lr": 1e-3,
                            "head_lr": head_lr}))
        pre_real = None
        if with_real:
            from med3d_ext.data import real as build_real

            n_real = max(2, sz["cases"])
            real_root = build_once(d["root"].parent / f"real-c{n_real}",  # cached like synth
                                   lambda r: build_real(r, cases=n_real, seed=0))
            real_dirs = sorted(p for p in real_root.iterdir() if p.is_dir())
            log(f"pretraining ResNet-10 on the 8 synthetic domains + {len(real_dirs)} real "
                f"dataset(s) ({', '.join(p.name for p in real_dirs)}), same budget")
            pre_real = run_pretrain(C.resolve("pretrain", dict(
                common, seed=seeds[0], data=[str(d["pretrain"])] + [str(p) for p in real_dirs],
                out=str(runs / "pretrain-real"), depth=10, epochs=sz["pre_epochs"],
                steps=sz["pre_steps"], val_fraction=0.25, val_cases=1, lr=1e-3,
                cache=str(real_root / "cache"))), log=_quiet)
            log(f"  pretraining (+real): {pre_real['time_s']:.0f} s, validation Dice "
                f"{pre_real['best_score']:.3f}")
            arms.append((WITH_REAL, {"pretrained": str(runs / "pretrain-real" / "last.pt"),
                                     "lr": 1e-3, "head_lr": head_lr}))
        if medicalnet is not None:
            if mn_arch[0] != 10:
                log(f"  note: {medicalnet} holds a ResNet-{mn_arch[0]}; the other arms train a "
                    "ResNet-10 (same steps and data, not the same network)")
            arms.append((MEDICALNET, {"pretrained": str(medicalnet), "lr": 1e-3, "head_lr": head_lr}))
        curves: dict = {a: {} for a, _ in arms}
        times: dict = {a: [] for a, _ in arms}
        try:
            from .common import collect_env
        except ImportError:
            from benchmarks.common import collect_env
        env = collect_env(dev.type)

        def finish(done: list) -> dict:
            """Summary of the seeds whose arms have all run, written out (after every seed,
            so a study stopped by a time limit keeps what it finished; "partial" says so)."""
            summary = summarize({a: {sd: c for sd, c in by.items() if sd in done}
                                 for a, by in curves.items()})
            for arm in summary["arms"]:
                ts = times[arm][:len(done)]
                summary["arms"][arm]["time_s_mean"] = _mean(ts)
                steps = sz["every"] * sz["evals"]
                summary["arms"][arm]["ms_per_step"] = 1e3 * _mean(ts) / steps  # incl. validation
            summary.update(
                sizes=sz, device=str(dev), seeds=list(done), pretrain_shared=True, threads=threads,
                partial=None if len(done) == len(seeds) else
                f"{len(done)} of {len(seeds)} seeds ({list(seeds)}) finished",
                lrs={"scratch": 1e-3, "pretrained_encoder": 1e-3, "pretrained_head": head_lr},
                pretrain={"steps": sz["pre_epochs"] * sz["pre_steps"], "time_s": pre["time_s"],
                          "val_dice": pre["best_score"], "seed": seeds[0]},
                medicalnet=str(medicalnet) if medicalnet else None,
                medicalnet_arch=None if mn_arch is None else {"depth": mn_arch[0], "shortcut": mn_arch[1]},
                data_s=t_data,
                pretrain_real=None if pre_real is None else {
                    "steps": sz["pre_epochs"] * sz["pre_steps"], "time_s": pre_real["time_s"],
                    "val_dice": pre_real["best_score"]},
                transfer_task=d["transfer"].name, total_s=time.perf_counter() - t_all,
                curves={a: {str(sd): c for sd, c in by.items() if sd in done}
                        for a, by in curves.items()},
                env=env)
            write_outputs(out, summary, log if len(done) == len(seeds) else _quiet)
            return summary

        summary = None
        for i, seed in enumerate(seeds):
            for k, (arm, extra) in enumerate(arms):
                folder = runs / f"seed{seed}-arm{k}"
                tr = run_transfer(C.resolve("transfer", dict(
                    common, seed=seed, data=[str(d["transfer"])], out=str(folder), task="seg",
                    epochs=sz["evals"], steps=sz["every"], val_fraction=sz["val_fraction"],
                    target_dice=1.0, **extra)), log=_quiet)  # (its own targets: below)
                curves[arm][seed] = val_curve(folder)
                times[arm].append(tr["time_s"])
                log(f"  seed {seed} {arm}: Dice " + " ".join(f"{v:.3f}" for v in curves[arm][seed]["dice"])
                    + f" ({tr['time_s']:.0f} s)")
            summary = finish(list(seeds[:i + 1]))
        return summary
    finally:
        if tmp is not None:
            tmp.cleanup()


# ----------------------------------------------------------------------------- outputs


def _f(v, spec=".3f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


COLLAPSED = 0.01  # final Dice below this: the run predicts (almost) only background


def _paired(sc: dict, ours: dict) -> str:
    """The two arms compared seed by seed: both arms of a seed draw the same patches (the
    sampler is counter-based on the run seed), so a per-seed difference is free of that
    seed's luck with the data order. Empty with fewer than 2 shared seeds."""
    fs = dict(zip(map(str, sc["seeds"]), sc["final"]))
    fo = dict(zip(map(str, ours["seeds"]), ours["final"]))
    common = [k for k in fs if k in fo and not math.isnan(fs[k]) and not math.isnan(fo[k])]
    if len(common) < 2:
        return ""
    d = [fo[k] - fs[k] for k in common]
    n, up = len(d), sum(1 for v in d if v > 0)
    txt = (f" Seed by seed (both arms of a seed draw the same patches), the pretrained final Dice "
           f"is higher in {up} of {n} seeds (mean difference {_mean(d):+.3f}, sd {_std(d):.3f})")
    ss, so = sc["steps_to_target_per_seed"], ours["steps_to_target_per_seed"]
    ratios = [ss[k] / so[k] for k in common if ss.get(k) and so.get(k)]
    faster = sum(1 for k in common if so.get(k) and (not ss.get(k) or so[k] < ss[k]))
    txt += (f", and it reaches its seed's from-scratch final Dice in fewer steps in {faster} of "
            f"{n} seeds" + (f" (ratios {', '.join(f'{r:.1f}x' for r in ratios)})" if ratios else ""))
    return txt + "."


def reading(s: dict) -> str:
    """One honest paragraph from the numbers (no claim the numbers do not carry)."""
    sc, ours = s["arms"][SCRATCH], s["arms"].get(OURS)
    if ours is None:
        return "Only the from-scratch arm ran."
    gain = ours["dice_gain_vs_scratch"]
    spread = max(sc["final_std"], ours["final_std"])
    n = len(s["seeds"])
    if ours["speedup_vs_scratch"]:
        conv = (f"the pretrained encoder's mean curve reached the from-scratch final Dice "
                f"({s['target']:.3f}) at step {ours['steps_to_target']} against "
                f"{sc['steps_to_target']} from scratch ({ours['speedup_vs_scratch']:.1f}x fewer "
                f"steps, at this curve's resolution of {s['sizes']['every']} steps)")
    else:
        conv = (f"the pretrained encoder did not reach the from-scratch final Dice "
                f"({s['target']:.3f}) on its mean curve within the budget")
    # the whole curve, not only the end: mean Dice of each arm at half the budget
    steps = sc["steps"]
    # the validation step nearest half the budget (len // 2 - 1 was a third of it for 3 steps)
    mid = min(range(len(steps)), key=lambda i: abs(steps[i] - steps[-1] / 2))
    halfway = (f"; at step {steps[mid]} (the validation nearest half the {steps[-1]}-step budget) "
               f"the mean validation Dice is "
               f"{_f(ours['mean'][mid])} pretrained against {_f(sc['mean'][mid])} from scratch")
    if abs(gain) <= spread:
        acc = (f"the final Dice difference ({gain:+.3f}) is within the seed spread "
               f"(std up to {spread:.3f}, {n} seeds), so the means alone do not show an accuracy gain")
    elif gain > 0:
        acc = f"final Dice is higher by {gain:+.3f} (seed std up to {spread:.3f}, {n} seeds)"
    else:
        acc = f"final Dice is LOWER by {-gain:.3f} (seed std up to {spread:.3f}, {n} seeds)"
    paired = _paired(sc, ours)
    coll = []
    for arm, a in s["arms"].items():
        k = sum(1 for v in a["final"] if v < COLLAPSED)
        if k:
            coll.append(f"{k} of {n} {arm} runs ended predicting background only (final Dice "
                        f"< {COLLAPSED})")
    coll_txt = (" " + "; ".join(coll) + ", so the means mix collapsed and working runs and the "
                "per-seed curves in convergence.json say more than the means.") if coll else ""
    others = ""
    for arm, a in s["arms"].items():
        if arm in (SCRATCH, OURS):
            continue
        st = a["steps_to_target"]
        others += (f" The '{arm}' arm: final Dice {_f(a['final_mean'])} ± {_f(a['final_std'])} "
                   f"({a['dice_gain_vs_scratch']:+.3f} vs scratch), mean Dice "
                   f"{_f(a['mean'][mid])} at step {steps[mid]}, target "
                   + (f"reached at step {st}." if st is not None else "not reached."))
    return (f"On {s['device']} with {s['pretrain']['steps']} pretraining steps and "
            f"{sc['steps'][-1]} transfer steps per arm, {conv}{halfway}; {acc}.{paired}{coll_txt} The paper "
            f"reports 2-10x faster convergence and +3-20% accuracy after pretraining on real "
            f"3DSeg-8 for far longer; this is a miniature on synthetic data with a tiny budget "
            f"and few validation cases, so it tests the mechanism, not the paper's magnitudes."
            + others)


def markdown(s: dict) -> str:
    sz = s["sizes"]
    lines = [f"# Convergence study: transfer vs from scratch ({s['transfer_task']})", "",
             f"device {s['device']} ({s.get('threads') or 'default'} torch threads); seeds "
             f"{s['seeds']}; ResNet-10, patch {sz['patch']}, batch "
             f"{sz['batch']}; pretraining {s['pretrain']['steps']} steps on 8 synthetic domains "
             f"(shared by all seeds, {s['pretrain']['time_s']:.0f} s); transfer "
             f"{sz['every'] * sz['evals']} steps per arm, validation every {sz['every']} steps; "
             f"total {s['total_s'] / 60:.1f} min.", ""]
    if s.get("partial"):  # written after every seed: a study stopped early keeps what it finished
        lines += [f"**Partial: {s['partial']}** (the study was stopped or is still running).", ""]
    lines += [f"Target: {s['target_rule']} = {_f(s['target'])}.", "",
             "| arm | final Dice mean ± std (min–max) | best Dice (mean) | steps to target "
             "(mean curve) | per seed | speed-up | ΔDice vs scratch | s per run |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, a in s["arms"].items():
        per = ", ".join(f"{k}: {v if v is not None else '—'}" for k, v in a["steps_to_target_per_seed"].items())
        lines.append(
            f"| {arm} | {_f(a['final_mean'])} ± {_f(a['final_std'])} ({_f(a['final_min'])}–"
            f"{_f(a['final_max'])}) | {_f(a['best_mean'])} | "
            f"{a['steps_to_target'] if a['steps_to_target'] is not None else 'not reached'} | {per} | "
            f"{_f(a['speedup_vs_scratch'], '.1f') + 'x' if a['speedup_vs_scratch'] else '—'} | "
            f"{a['dice_gain_vs_scratch']:+.3f} | {_f(a.get('time_s_mean'), '.0f')} |")
    if s.get("lrs"):
        lines += ["", f"Learning rates (AdamW, poly): {s['lrs']}."]
    if s.get("medicalnet"):
        arch = s.get("medicalnet_arch") or {}
        lines += ["", f"'{MEDICALNET}': {s['medicalnet']} (ResNet-{arch.get('depth', '?')}, shortcut "
                  f"{arch.get('shortcut', '?')}; the other arms train a ResNet-10)."]
    lines += ["", "Final Dice per seed: " + "; ".join(
        f"{arm}: " + ", ".join(f"seed {k} {_f(v)}" for k, v in zip(a["seeds"], a["final"]))
        for arm, a in s["arms"].items()) + "."]
    first = next(iter(s["arms"].values()))
    epochs = first.get("epochs")  # None for curves read before metrics.jsonl had them
    ep = epochs is not None and len(epochs) == len(first["steps"])
    lines += ["", "Mean validation Dice against step (min–max over seeds):", "",
              "| step | " + ("epoch | " if ep else "") + " | ".join(s["arms"]) + " |",
              "|---" * (len(s["arms"]) + 1 + ep) + "|"]
    for i, st in enumerate(first["steps"]):
        lines.append(f"| {st} | " + (f"{epochs[i]} | " if ep else "") + " | ".join(
            f"{_f(a['mean'][i])} ({_f(a['min'][i])}–{_f(a['max'][i])})" for a in s["arms"].values()) + " |")
    lines += ["", "## Reading", "", reading(s), ""]
    if s.get("plot_note"):
        lines += [s["plot_note"], ""]
    return "\n".join(lines)


def plot(s: dict, path) -> Path | None:
    """Mean Dice with a min-max band across seeds; None (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, a in s["arms"].items():
        (ln,) = ax.plot(a["steps"], a["mean"], marker="o", label=f"{arm} (n={len(a['seeds'])})")
        ax.fill_between(a["steps"], a["min"], a["max"], color=ln.get_color(), alpha=0.2)
    ax.axhline(s["target"], color="grey", ls="--", lw=1, label="target: scratch final Dice")
    ax.set_xlabel("transfer step")
    ax.set_ylabel("validation Dice (held-out cases)")
    ax.set_title(f"{s['transfer_task']} on {s['device']}: mean, min-max band")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_outputs(out, s: dict, log=print, stem="convergence") -> None:
    from benchmarks.common import _jsonable

    out = Path(out)
    s.pop("plot_note", None)
    png = plot(s, out / f"{stem}.png")
    if png is None:
        s["plot_note"] = ("No PNG: matplotlib is not installed in this environment (install the "
                          "`bench` extra: pip install med3d_ext[bench]); the curves are in the "
                          "table above and in convergence.json.")
        log(s["plot_note"])
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(s), indent=1))
    (out / f"{stem}.md").write_text(markdown(s))
    log(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {png}" if png else ""))


# ----------------------------------------------------------------------------- benchmark area


def run(ctx) -> None:
    """The ``convergence`` area: quick = 2 seeds at the quick sizes (about a minute on 2 CPU
    cores); otherwise 3 seeds at the device's sizes. One row per arm."""
    from .common import OK, UNAVAILABLE, Unavailable, m3d_attr, optional_import

    try:
        m3d_attr("train")
        m3d_attr("models")
        optional_import("nibabel")  # the synthetic 3DSeg-8 is written as NIfTI
    except Unavailable as exc:
        ctx.record("convergence", "transfer vs scratch", "med3d_ext.train", UNAVAILABLE, str(exc))
        return
    import torch

    seeds = (0, 1) if ctx.quick else (0, 1, 2)
    threads = torch.get_num_threads()  # the training sets its own: later areas keep theirs
    try:
        def log(*a):  # not the study's own "wrote <temporary folder>" (deleted right after)
            line = " ".join(map(str, a))
            if not line.startswith("wrote "):
                print("  " + line, flush=True)

        with tempfile.TemporaryDirectory(prefix="m3d-conv-area-") as tmp:
            s = run_study(tmp, seeds=seeds, device=ctx.device, quick=ctx.quick, log=log)
    finally:
        torch.set_num_threads(threads)
    params = {"task": s["transfer_task"], "seeds": list(seeds), "patch": s["sizes"]["patch"],
              "batch": s["sizes"]["batch"], "transfer_steps": s["sizes"]["every"] * s["sizes"]["evals"],
              "pretrain_steps": s["pretrain"]["steps"], "target_dice": s["target"]}
    rows = []
    for arm, a in s["arms"].items():
        rows.append({"area": "convergence", "case": "transfer vs scratch", "impl": arm,
                     "baseline": arm == SCRATCH, "reference": False, "params": params,
                     "status": OK, "median_ms": a["ms_per_step"],
                     "note": (f"final Dice {a['final_mean']:.3f} ± {a['final_std']:.3f}, target "
                              f"{s['target']:.3f} "
                              + (f"reached at step {a['steps_to_target']}"
                                 if a["steps_to_target"] is not None else "not reached")
                              + "; time = ms per transfer step incl. validation"),
                     "final_dice": a["final_mean"], "final_dice_std": a["final_std"],
                     "steps_to_target": a["steps_to_target"],
                     "convergence_speedup": a["speedup_vs_scratch"],
                     "dice_gain": a["dice_gain_vs_scratch"]})
    ctx.add_rows(rows)


# ----------------------------------------------------------------------------- CLI


def _unused_name(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... when it already holds files."""
    cand, k = path, 1
    while os.path.isdir(cand) and os.listdir(cand):
        k += 1
        cand = f"{path}-{k}"
    return cand


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a result)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="transfer seeds (default 0 1 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/"
                   "<date>_<device>-convergence, -2, -3, ... when that one holds files; with "
                   "--quick benchmarks/results/latest/convergence-quick)")
    p.add_argument("--medicalnet", default=None, metavar="PATH",
                   help="MedicalNet-layout ResNet weights (.pth/.safetensors): a third arm")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default or 0: torch's; use 1 on a CPU shared with "
                        "other jobs)")
    p.add_argument("--head-lr", type=float, default=1e-3,
                   help="learning rate of the new head in the pretrained arms (default 1e-3, "
                        "the encoder's and the from-scratch arm's)")
    p.add_argument("--with-real", action="store_true",
                   help="one more arm pretrained on the synthetic domains + the packaged real MR "
                        "volumes (needs nilearn: pip install med3d_ext[real])")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the markdown (and the PNG, with matplotlib) next to an "
                        "existing convergence.json; trains nothing")
    p.add_argument("--cases", type=int, default=None,
                   help="cases per synthetic dataset (default: the demo's, 4 on CPU, 8 on GPU)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretraining steps (default: the demo's, 600 on CPU, 2000 on GPU)")
    p.add_argument("--transfer-steps", type=int, default=None,
                   help="transfer steps per arm (default: the demo's, 300 on CPU, 500 on GPU)")
    p.add_argument("--runs", default=None, help="keep the run folders (checkpoints, metrics) here "
                   "(default: a temporary folder, deleted)")
    a = p.parse_args(argv)
    if a.threads is not None and a.threads < 0:  # said before any data is made or --out written
        p.error(f"--threads must be >= 0 (0: torch's default), got {a.threads}")
    if a.render:
        try:
            s = json.loads(Path(a.render).read_text())
            if not isinstance(s, dict) or not isinstance(s.get("arms"), dict):
                raise ValueError("not a convergence.json (no 'arms')")
            write_outputs(Path(a.render).parent, s, stem=Path(a.render).stem)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: --render {a.render!r}: {exc}", file=sys.stderr)
            return 2
        return 0
    dev = a.device
    if dev == "auto":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    # a --quick smoke test goes to the git-ignored results/latest/: under the dated name it
    # overwrote the committed study of that day (results/<date>_cpu-convergence/)
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                os.path.join("latest", "convergence-quick") if a.quick else
                                f"{time.strftime('%Y-%m-%d')}_{dev}-convergence")
    if not a.out and not a.quick:
        out = _unused_name(out)  # a second study that day does not overwrite a committed one
    try:
        s = run_study(out, seeds=a.seeds, device=dev, quick=a.quick, medicalnet=a.medicalnet,
                      runs=a.runs, threads=a.threads, head_lr=a.head_lr, with_real=a.with_real,
                      cases=a.cases, pretrain_steps=a.pretrain_steps,
                      transfer_steps=a.transfer_steps)
    except (FileNotFoundError, ValueError, ImportError) as exc:  # e.g. --with-real without nilearn
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out under a file
        name = str(exc.filename or "")
        where = "--out " if name and os.path.abspath(name).startswith(os.path.abspath(out)) else ""
        print(f"error: {where}{name}{': ' if name else ''}{exc.strerror or exc}",
              file=sys.stderr)
        return 2
    except Exception as exc:  # a bad --device (DeviceError), a refused weights file, ...
        from med3d_ext.models.weights import MedicalNetWeightsError
        from med3d_ext.train.distributed import DeviceError

        if not isinstance(exc, (DeviceError, MedicalNetWeightsError)):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + reading(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
