"""What a reader must know beside a result row's name (used by the tables of common.py and
by publish.py, which does not import torch)."""

from __future__ import annotations


# what a row's "check" says when its output was not compared with a reference: the check was
# impossible, or the outputs are not comparable (the pipeline's arms draw different random
# transforms; its training rows check only that the loss is finite, "loss finite" in committed
# results)
_NOT_COMPARED = ("not checked", "not compared", "finite only")


def unchecked(row: dict) -> bool:
    """A timed med3d_ext row whose output was not checked against the reference: its speed-up
    is then a timing without a correctness check."""
    check = str(row.get("check", ""))
    return (not row.get("baseline") and row.get("status") == "ok"  # common.OK
            and (any(m in check for m in _NOT_COMPARED) or check == "loss finite"))


def caveats(row: dict) -> str:
    """What a reader must know beside a row's name: a caveat added to committed results (a
    known reason the row is not what its name says) and an unchecked output."""
    out = ""
    if row.get("caveat"):
        out += f" [{row['caveat']}]"
    if unchecked(row):
        out += f" [output not checked: {row['check']}]"
    return out
