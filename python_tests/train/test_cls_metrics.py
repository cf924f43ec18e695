"""Classification evaluation metrics: ROC AUC against MONAI and a pair count, the confusion
matrix and per-class rates against hand-made and brute-force answers, and evaluate's
predictions.csv / metrics.json / table on a tiny classification run."""

from __future__ import annotations

import csv
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from med3d_ext.train import metrics as M


def _gen():
    seed = int(torch.randint(0, 2**31, ()))
    return torch.Generator().manual_seed(seed), seed


def _pair_auc(scores, positive) -> float:
    """AUC by brute force: every (positive, negative) pair, a tie counting half."""
    s, t = list(map(float, scores)), list(map(bool, positive))
    pos = [a for a, p in zip(s, t) if p]
    neg = [a for a, p in zip(s, t) if not p]
    if not pos or not neg:
        return float("nan")
    twice = sum(2 * (a > b) + (a == b) for a in pos for b in neg)
    return twice / (2 * len(pos) * len(neg))


def _monai_auc(y_pred, y, **kw):
    mm = pytest.importorskip("monai.metrics")
    with warnings.catch_warnings():  # MONAI warns (and returns NaN) for a one-sided class
        warnings.simplefilter("ignore")
        return mm.compute_roc_auc(y_pred, y, **kw)


# --- ROC AUC ---------------------------------------------------------------------------------

def test_auc_binary_against_monai_and_pair_count():
    pytest.importorskip("monai")
    g, seed = _gen()
    for _ in range(20):
        n = int(torch.randint(2, 80, (), generator=g))
        y = torch.randint(0, 2, (n,), generator=g)
        y[0], y[1] = 0, 1  # both sides present
        # quantised scores: many ties between positives and negatives
        s = torch.round(torch.rand(n, generator=g, dtype=torch.float64) * 6) / 6
        ours = M.roc_auc(s, y.bool())
        assert ours == _pair_auc(s, y), seed  # the same exact fraction
        assert ours == pytest.approx(float(_monai_auc(s, y)), rel=1e-12, abs=1e-12), seed
    # numpy input and 0/1 labels give the same
    assert M.roc_auc(s.numpy(), y.numpy()) == ours


def test_auc_multiclass_against_monai():
    pytest.importorskip("monai")
    g, seed = _gen()
    for absent in (None, 2):
        c, n = 4, 60
        y = torch.randint(0, c, (n,), generator=g)
        y[:c] = torch.arange(c)
        if absent is not None:
            y[y == absent] = (absent + 1) % c
        probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, 1)
        probs = torch.round(probs * 10) / 10  # ties
        onehot = F.one_hot(y, c)
        per = M.roc_auc_ovr(probs, y)
        ref = _monai_auc(probs, onehot, average="none")
        np.testing.assert_allclose(per, ref, rtol=1e-12, atol=1e-12, err_msg=str(seed))
        for k in range(c):
            assert per[k] == _pair_auc(probs[:, k], y == k) or (
                math.isnan(per[k]) and k == absent), (seed, k)
        m = M.classification_metrics(y, probs, ["a", "b", "c", "d"])
        np.testing.assert_equal(m["auc_per_class"], dict(zip("abcd", per)))  # nan == nan
        if absent is None:
            macro = float(_monai_auc(probs, onehot, average="macro"))
            assert m["auc"] == pytest.approx(macro, rel=1e-12), seed
            assert m["auc_averaging"] == "macro one-vs-rest over 4 of 4 classes"
        else:  # MONAI's macro is NaN then; ours averages the classes that have an AUC
            assert math.isnan(per[absent])
            assert m["auc"] == pytest.approx(np.nanmean(ref), rel=1e-12), seed
            assert m["auc_averaging"] == "macro one-vs-rest over 3 of 4 classes"
            assert any(f"class {'abcd'[absent]}: no case has this label" in t
                       for t in m["notes"])


def test_auc_known_values_and_errors():
    assert M.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # sklearn's doc example
    assert M.roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5  # all tied: half credit
    assert M.roc_auc([0.2, 0.5, 0.5], [0, 0, 1]) == 0.75  # 1 win + 1 tie of 2 pairs
    assert M.roc_auc([3, 2, 1], [1, 1, 0]) == 1.0
    assert M.roc_auc([1, 2, 3], [1, 1, 0]) == 0.0
    assert math.isnan(M.roc_auc([0.1, 0.9], [0, 0]))  # no positive
    assert math.isnan(M.roc_auc([0.1, 0.9], [1, 1]))  # no negative
    assert math.isnan(M.roc_auc([], []))
    # binary: both classes' AUCs rank the cases by p1 - p0 (for a softmax, the order of p1 and
    # of p0 in exact arithmetic): one number, even for rows that are not a softmax, where
    # class 0's own column would give 0.625 here
    m = M.classification_metrics([0, 1, 1, 0], [[.5, .4], [.5, .6], [.6, .3], [.9, .1]],
                                 ["0", "1"])
    assert m["auc"] == 0.75 and m["auc_per_class"] == {"0": 0.75, "1": 0.75}
    with pytest.raises(ValueError, match="scores must be finite, got nan"):
        M.roc_auc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2,\)"):
        M.roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"booleans \(or 0/1\), got values \[0, 2\]"):
        M.roc_auc([0.1, 0.2], [0, 2])


# --- confusion matrix and per-class rates ----------------------------------------------------

def test_confusion_matrix_and_rates_hand_example():
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 1, 0, 1, 1, 2]
    cm = M.confusion_matrix(y, p, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    r = M.class_rates(cm)
    assert r["support"] == [3, 2, 1]
    assert r["sensitivity"] == [2 / 3, 1.0, 1.0]
    assert r["specificity"] == [1.0, 3 / 4, 1.0]
    assert r["precision"] == [1.0, 2 / 3, 1.0]
    assert M.balanced_accuracy(cm) == pytest.approx(8 / 9, rel=1e-15)
    # through classification_metrics: the argmax of the probabilities is the prediction
    probs = np.eye(3)[p] * 0.6 + 0.4 / 3
    m = M.classification_metrics(torch.tensor(y), torch.from_numpy(probs), [0, 1, 2])
    assert m["confusion_matrix"] == {"classes": ["0", "1", "2"],
                                     "counts": [[2, 1, 0], [0, 2, 0], [0, 0, 1]]}
    assert m["sensitivity"] == {"0": 2 / 3, "1": 1.0, "2": 1.0}
    assert m["specificity"] == {"0": 1.0, "1": 0.75, "2": 1.0}
    assert m["precision"] == {"0": 1.0, "1": 2 / 3, "2": 1.0}
    assert m["support"] == {"0": 3, "1": 2, "2": 1} and m["notes"] == []


def test_rates_against_brute_force():
    g, seed = _gen()
    c = 5
    for _ in range(10):
        n = int(torch.randint(1, 40, (), generator=g))
        y = torch.randint(0, c - 1, (n,), generator=g)  # class 4 never a label
        p = torch.randint(0, c, (n,), generator=g)
        cm = M.confusion_matrix(y, p, c)
        r = M.class_rates(cm)
        yl, pl = y.tolist(), p.tolist()
        for i in range(c):
            for j in range(c):
                assert cm[i, j] == sum(a == i and b == j for a, b in zip(yl, pl)), seed
            tp = sum(a == i and b == i for a, b in zip(yl, pl))
            fn = sum(a == i and b != i for a, b in zip(yl, pl))
            fp = sum(a != i and b == i for a, b in zip(yl, pl))
            tn = sum(a != i and b != i for a, b in zip(yl, pl))
            for key, num, den in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                                  ("precision", tp, tp + fp)):
                want = num / den if den else float("nan")
                got = r[key][i]
                assert (math.isnan(got) and math.isnan(want)) or got == want, (seed, key, i)
        assert math.isnan(r["sensitivity"][4])  # absent class: undefined, not 0
        present = [i for i in range(c) if i in yl]
        want = sum(r["sensitivity"][i] for i in present) / len(present)
        assert M.balanced_accuracy(cm) == pytest.approx(want, rel=1e-12), seed


def test_absent_class_single_case_and_one_predicted_class():
    # a class absent from the labels: its sensitivity and AUC null, out of balanced accuracy
    y = [0, 0, 1, 1]
    probs = np.array([[.7, .2, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1]])
    m = M.classification_metrics(y, probs, ["0", "1", "2"])
    assert math.isnan(m["sensitivity"]["2"]) and math.isnan(m["auc_per_class"]["2"])
    assert m["specificity"]["2"] == 1.0 and math.isnan(m["precision"]["2"])
    assert m["balanced_accuracy"] == 0.75  # (1/2 + 1) / 2, class 2 left out
    assert m["auc"] == (1.0 + 1.0) / 2  # classes 0 and 1 separate perfectly
    assert ("class 2: no case has this label: sensitivity and AUC undefined (nan), left out of "
            "the balanced accuracy and the macro AUC") in m["notes"]
    assert "precision undefined (nan) for class(es) never predicted: 2" in m["notes"]
    # a single case: its class has no negatives, the others no positives
    m = M.classification_metrics([1], np.array([[.2, .8]]), ["0", "1"])
    assert m["confusion_matrix"]["counts"] == [[0, 0], [0, 1]]
    assert m["sensitivity"]["1"] == 1.0 and math.isnan(m["sensitivity"]["0"])
    assert math.isnan(m["specificity"]["1"]) and m["specificity"]["0"] == 1.0
    assert m["balanced_accuracy"] == 1.0 and math.isnan(m["auc"])
    assert m["auc_averaging"] == "binary: class 1 (positive) vs 0"
    assert any(t.startswith("class 1: every case has this label (no negatives)")
               for t in m["notes"])
    # every prediction one class
    m = M.classification_metrics([0, 1, 1, 0, 1], np.tile([.9, .1], (5, 1)) +
                                 np.array([[0, 0], [0, 0], [.05, -.05], [0, 0], [0, 0]]),
                                 ["0", "1"])
    assert m["confusion_matrix"]["counts"] == [[2, 0], [3, 0]]
    assert m["sensitivity"] == {"0": 1.0, "1": 0.0}
    assert m["specificity"] == {"0": 0.0, "1": 1.0}
    assert m["precision"]["0"] == 0.4 and math.isnan(m["precision"]["1"])
    assert m["balanced_accuracy"] == 0.5
    # positives' class-1 scores {.1, .05, .1} vs negatives' {.1, .1}: 4 ties, 2 losses of 6
    assert m["auc"] == 4 / 12


def test_given_predictions_and_non_finite_probabilities():
    probs = np.array([[.6, .4], [.3, .7], [np.nan, np.nan], [.2, .8]])
    # the caller's predictions are counted (the ones it wrote), not a re-derived argmax
    m = M.classification_metrics([0, 1, 0, 1], probs, ["0", "1"], preds=[0, 1, 1, 1])
    assert m["confusion_matrix"]["counts"] == [[1, 1], [0, 2]]
    assert m["sensitivity"] == {"0": 0.5, "1": 1.0} and m["precision"]["1"] == 2 / 3
    # a NaN row (a diverged model): no AUC, said so, instead of an error or a made-up ranking
    assert math.isnan(m["auc"]) and all(math.isnan(v) for v in m["auc_per_class"].values())
    assert "1 case(s) have non-finite probabilities (a diverged model?): AUC undefined (nan)" \
        in m["notes"]
    m = M.classification_metrics([0, 1, 0, 1], probs[[0, 1, 0, 3]], ["0", "1"])
    assert m["auc"] == 1.0 and m["notes"] == []


def test_binary_auc_of_a_confident_model_is_one_number():
    """Softmax probabilities of logits with large margins: p1 rounds to exactly 1.0 in float32
    for many cases while p0 (1e-9 .. 1e-30) still orders them. Ranked by p1 alone, the positive
    class's AUC lost that order and disagreed with the negative class's; both now equal the
    AUC of the logit margin itself (float64, brute force)."""
    g, seed = _gen()
    n = 41
    y = torch.randint(0, 2, (n,), generator=g)
    y[:2] = torch.tensor([0, 1])
    margin = torch.randn(n, generator=g, dtype=torch.float64) * 4 + 40 * (2 * y - 1) * \
        torch.rand(n, generator=g, dtype=torch.float64)
    logits = torch.stack([torch.zeros(n, dtype=torch.float64), margin], 1)
    probs = torch.softmax(logits.float(), 1)  # float32, as a model's output is
    assert (probs[:, 1] == 1.0).sum() > 2, seed  # saturated cases exist
    m = M.classification_metrics(y, probs, ["0", "1"])
    want = _pair_auc(margin, y.bool())
    assert m["auc_per_class"]["0"] == m["auc_per_class"]["1"] == m["auc"], seed
    assert m["auc"] == pytest.approx(want, abs=1e-12), seed


def test_argument_errors():
    with pytest.raises(ValueError, match=r"preds: class index 3 is outside 0..2 \(3 classes\)"):
        M.confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="2 labels but 3 predictions"):
        M.confusion_matrix([0, 1], [0, 1, 1], 3)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        M.confusion_matrix([], [], 0)
    with pytest.raises(ValueError, match="labels: expected integer class indices, got dtype "
                                         "float64"):
        M.confusion_matrix(np.array([0.0, 1.0]), [0, 1], 2)
    with pytest.raises(ValueError, match=r"probs must be \(cases, 2\) for classes \['0', '1'\]"):
        M.classification_metrics([0], np.ones((1, 3)) / 3, ["0", "1"])


# --- evaluate end to end ---------------------------------------------------------------------

def _evaluate(run, data, out, capsys):
    from med3d_ext.train.cli import main

    capsys.readouterr()
    assert main(["evaluate", "--run", run, "--data", data, "--out", out, "--device", "cpu",
                 "--no-progress"]) == 0
    text = capsys.readouterr()
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "metrics.json").read_text()), text.out + text.err


def test_evaluate_cls_outputs(cls_run, tiny_data, tmp_path, capsys):
    rows, summary, log = _evaluate(cls_run, tiny_data["cls"], tmp_path / "p", capsys)
    header = (tmp_path / "p" / "predictions.csv").read_text().splitlines()[0]
    assert header == ("case,file,label,label_name,prediction,prediction_name,probability,"
                      "prob_0,prob_1")
    assert len(rows) == 8 and {r["label"] for r in rows} == {"0", "1"}
    names = {"0": "no tumour", "1": "tumour"}  # the synthetic folder's classes.json
    assert summary["class_names"] == names
    for r in rows:
        assert r["label_name"] == names[r["label"]]
        assert r["prediction_name"] == names[r["prediction"]]
        p = [float(r["prob_0"]), float(r["prob_1"])]
        assert sum(p) == pytest.approx(1.0, abs=1e-6)
        assert r["prediction"] == str(int(np.argmax(p)))
        assert float(r["probability"]) == max(p)
    # metrics.json agrees with predictions.csv recomputed here
    counts = [[sum(r["label"] == str(i) and r["prediction"] == str(j) for r in rows)
               for j in range(2)] for i in range(2)]
    assert summary["confusion_matrix"] == {"classes": ["0", "1"], "counts": counts}
    assert summary["accuracy"] == pytest.approx(
        sum(r["label"] == r["prediction"] for r in rows) / len(rows), rel=1e-12)
    sens = [counts[i][i] / sum(counts[i]) for i in range(2)]
    assert summary["sensitivity"] == {"0": sens[0], "1": sens[1]}
    assert summary["balanced_accuracy"] == pytest.approx(sum(sens) / 2, rel=1e-12)
    auc = _pair_auc([float(r["prob_1"]) for r in rows], [r["label"] == "1" for r in rows])
    assert summary["auc"] == pytest.approx(auc, rel=1e-6)
    assert summary["auc_per_class"]["1"] == summary["auc"]
    assert summary["auc_averaging"] == "binary: class 1 (positive) vs 0"
    assert summary["support"] == {"0": counts[0][0] + counts[0][1],
                                  "1": counts[1][0] + counts[1][1]}
    assert len(summary["cases"]) == 8 and "prob_1" in summary["cases"][0]
    # the log: the per-class table, the summary line, the existing last line
    lines = log.splitlines()
    i = lines.index("class | n | sensitivity | specificity | precision | AUC")
    assert lines[i + 1].startswith(f"0 (no tumour) | {summary['support']['0']} | ")
    assert lines[i + 2].startswith(f"1 (tumour) | {summary['support']['1']} | ")
    assert lines[i + 3].startswith(f"accuracy {summary['accuracy']:.3f} | balanced accuracy "
                                   f"{summary['balanced_accuracy']:.3f} | AUC ")
    assert f"accuracy {summary['accuracy']:.3f} on 8 cases; predictions in" in log


def test_evaluate_cls_one_label_only(cls_run, tiny_data, tmp_path, capsys):
    """Labels of one class only: AUC and the other class's sensitivity are null in
    metrics.json (valid JSON, no NaN), and the log says why."""
    root = tmp_path / "cls"
    shutil.copytree(tiny_data["cls"], root)
    lines = (root / "labels.csv").read_text().splitlines()
    keep = [ln for ln in lines[1:] if ln.rsplit(",", 1)[1].strip() == "0"]
    assert keep
    (root / "labels.csv").write_text("\n".join([lines[0], *keep]) + "\n")
    rows, summary, log = _evaluate(cls_run, root, tmp_path / "p", capsys)
    assert len(rows) == len(keep)
    raw = (tmp_path / "p" / "metrics.json").read_text()
    assert "NaN" not in raw
    assert summary["auc"] is None and summary["auc_per_class"] == {"0": None, "1": None}
    assert summary["sensitivity"]["1"] is None and summary["specificity"]["0"] is None
    assert summary["support"] == {"0": len(keep), "1": 0}
    n0 = sum(r["prediction"] == "0" for r in rows)
    assert summary["confusion_matrix"]["counts"] == [[n0, len(keep) - n0], [0, 0]]
    assert summary["balanced_accuracy"] == pytest.approx(n0 / len(keep), rel=1e-12)
    assert "class 1: no case has this label: sensitivity and AUC undefined (nan)" in log
    assert "class 0: every case has this label (no negatives)" in log
    assert "1 (tumour) | 0 | nan | " in log


def test_class_names_only_where_known(cls_run, tiny_data, tmp_path, capsys):
    """Names come from the run (its folder's classes.json at training time), else from the
    evaluated folder's classes.json; with neither, predictions.csv keeps its nameless columns
    and the table shows bare classes."""
    from med3d_ext.train.cli import main

    data = tmp_path / "data"
    shutil.copytree(tiny_data["cls"], data)
    (data / "classes.json").unlink()
    # the run's names, though the folder evaluated has none
    rows, summary, log = _evaluate(cls_run, data, tmp_path / "a", capsys)
    assert summary["class_names"] == {"0": "no tumour", "1": "tumour"}
    assert {r["prediction_name"] for r in rows} <= {"no tumour", "tumour"}
    # a run without names (made before they were recorded, or from a folder without them)
    ck = torch.load(cls_run / "best.pt", weights_only=True)
    del ck["class_names"]
    torch.save(ck, tmp_path / "old.pt")
    rows, summary, log = _evaluate(tmp_path / "old.pt", data, tmp_path / "b", capsys)
    header = (tmp_path / "b" / "predictions.csv").read_text().splitlines()[0]
    assert header == "case,file,label,prediction,probability,prob_0,prob_1"
    assert summary["class_names"] == {} and "\n0 | 4 | " in "\n" + log.split("AUC\n", 1)[1]
    # ... whose evaluated folder has them: the folder's
    rows, summary, _ = _evaluate(tmp_path / "old.pt", tiny_data["cls"], tmp_path / "c", capsys)
    assert summary["class_names"] == {"0": "no tumour", "1": "tumour"}
    assert all(r["label_name"] == summary["class_names"][r["label"]] for r in rows)
    # predict has no folder: the run's names or none
    assert main(["predict", "--run", tmp_path / "old.pt", "--out", tmp_path / "p", "--images",
                 data / "images", "--device", "cpu", "--no-progress"]) == 0
    header = (tmp_path / "p" / "predictions.csv").read_text().splitlines()[0]
    assert header == "case,file,prediction,probability,prob_0,prob_1"
    capsys.readouterr()
    assert main(["predict", "--run", cls_run, "--out", tmp_path / "q", "--images",
                 data / "images", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "case_000: class 0 (no tumour) (" in out or "case_000: class 1 (tumour) (" in out


def test_class_names_that_differ_warn_and_odd_names_are_one_line(cls_run, tiny_data, tmp_path,
                                                                  capsys):
    """A folder whose classes.json names the run's classes otherwise (a swapped label
    convention?) is said; a name with a newline broke the table and the log, null named a
    class 'None'."""
    from med3d_ext.train.tasks import cls_class_names

    data = tmp_path / "data"
    shutil.copytree(tiny_data["cls"], data)
    (data / "classes.json").write_text(json.dumps({"classes": {"0": "tumour",
                                                               "1": "no tumour"}}))
    rows, summary, log = _evaluate(cls_run, data, tmp_path / "a", capsys)
    assert ("warning: " + repr(str(data)) + ": classes.json names class(es) ['0', '1'] "
            "differently from the run (0: 'tumour' here, 'no tumour' in the run; 1: 'no tumour' "
            "here, 'tumour' in the run); predictions.csv uses the run's names") in log, log
    assert summary["class_names"] == {"0": "no tumour", "1": "tumour"}  # the run's
    (data / "classes.json").write_text(json.dumps({"classes": {"0": "be\nnign ", "1": None,
                                                               "2": "  "}}))
    assert cls_class_names(data) == {"0": "be nign"}


def test_predictions_csv_is_utf8_whatever_the_locale(tmp_path):
    """Class names come from classes.json (UTF-8) in any language; predictions.csv was written
    in the locale's encoding, and under a C locale (no UTF-8 coercion) evaluate failed with
    UnicodeEncodeError after all its inference."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "p.csv"
    code = ("import sys; from pathlib import Path; from med3d_ext.train.evaluate import "
            "_write_csv, write_json; _write_csv(Path(sys.argv[1]), ['case', 'prediction_name'],"
            " [{'case': 'c\\u00e9', 'prediction_name': 'b\\u00e9nin, \\u00e9tage 2'}]); "
            "write_json(Path(sys.argv[1] + '.json'), {'n': 'b\\u00e9nin'})")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(out)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"case": "c\u00e9", "prediction_name": "b\u00e9nin, \u00e9tage 2"}]
    assert json.loads(Path(str(out) + ".json").read_text(encoding="utf-8")) == {"n": "b\u00e9nin"}


def test_a_resumed_run_keeps_its_class_names(tiny_data, tmp_path, capsys):
    """--resume read the folder's classes.json again: renamed classes got into last.pt but not
    best.pt (evaluate --checkpoint best / last then disagreed), a deleted file dropped them."""
    from med3d_ext.train.cli import main

    from .conftest import tiny_args

    data = tmp_path / "data"
    shutil.copytree(tiny_data["cls"], data)
    run = tmp_path / "run"
    assert main(["transfer", *tiny_args(data, run, "--task", "cls", "--from-scratch",
                                        "--epochs", 1, "--steps", 1)]) == 0
    names = {"0": "no tumour", "1": "tumour"}
    assert torch.load(run / "last.pt", weights_only=True)["class_names"] == names
    (data / "classes.json").write_text(json.dumps({"classes": {"0": "renamed0",
                                                               "1": "renamed1"}}))
    capsys.readouterr()
    assert main(["transfer", "--resume", run, "--epochs", 2, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "the data's classes.json now names the classes {'0': 'renamed0', '1': 'renamed1'}; " \
           "the run keeps the names it was trained with" in err, err
    for ck in ("last.pt", "best.pt"):
        assert torch.load(run / ck, weights_only=True)["class_names"] == names, ck


def test_split_cases_missing_from_the_folder_are_said(cls_run, tiny_data, tmp_path, capsys):
    """--split val on a folder without some of the run's validation cases scored the rest as
    if they were all; without any of them it reported 'accuracy nan on 0 cases' and exit 0."""
    from med3d_ext.train.cli import main

    val = torch.load(cls_run / "best.pt", weights_only=True)["split"]["cls"]["val"]
    assert len(val) >= 1
    data = tmp_path / "data"
    shutil.copytree(tiny_data["cls"], data)
    lines = (data / "labels.csv").read_text().splitlines()
    keep = [ln for ln in lines if ln.split(",")[0] != val[0]]
    assert len(keep) == len(lines) - 1
    (data / "labels.csv").write_text("\n".join(keep) + "\n")
    capsys.readouterr()
    args = ["evaluate", "--run", cls_run, "--data", data, "--device", "cpu", "--no-progress",
            "--split", "val"]
    if len(val) > 1:
        assert main([*args, "--out", tmp_path / "a"]) == 0
        err = capsys.readouterr().err
        assert f"--split val: 1 of the run's {len(val)} val case(s) of 'cls' are not in this " \
               f"folder (['{val[0]}']); scoring the {len(val) - 1} that are" in err, err
    keep = [ln for ln in lines if ln.split(",")[0] not in val]
    (data / "labels.csv").write_text("\n".join(keep) + "\n")
    assert main([*args, "--out", tmp_path / "b"]) == 2
    err = capsys.readouterr().err
    assert f"--split val: none of the run's {len(val)} val case(s) of 'cls' is in this folder" \
        in err, err


def test_folder_names_are_the_runs_classes_only(cls_run, tiny_data, tmp_path, capsys):
    """A folder's classes.json may declare classes the run's head does not predict (they
    showed in class_names); a file without its 'classes' key was ignored unsaid."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data["cls"], data)
    ck = torch.load(cls_run / "best.pt", weights_only=True)
    del ck["class_names"]
    torch.save(ck, tmp_path / "old.pt")
    (data / "classes.json").write_text(json.dumps({"classes": {"0": "neg", "1": "pos",
                                                               "2": "ghost"}}))
    _, summary, _ = _evaluate(tmp_path / "old.pt", data, tmp_path / "a", capsys)
    assert summary["class_names"] == {"0": "neg", "1": "pos"}
    (data / "classes.json").write_text(json.dumps({"0": "neg", "1": "pos"}))
    _, summary, log = _evaluate(tmp_path / "old.pt", data, tmp_path / "b", capsys)
    assert summary["class_names"] == {}
    assert "classes.json: no 'classes' key, so no class names" in log, log
