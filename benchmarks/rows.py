"""What a reader must know beside a result row's name (used by the tables of common.py and
by publish.py, which does not import torch)."""

from __future__ import annotations


def unchecked(row: dict) -> bool:
    """A timed med3d_ext row whose output was not checked against the reference (the check was
    impossible or not comparable): its speed-up is then a timing without a correctness check."""
    return (not row.get("baseline") and row.get("status") == "ok"  # common.OK
            and "not checked" in str(row.get("check", "")))


def caveats(row: dict) -> str:
    """What a reader must know beside a row's name: a caveat added to committed results (a
    known reason the row is not what its name says) and an unchecked output."""
    out = ""
    if row.get("caveat"):
        out += f" [{row['caveat']}]"
    if unchecked(row):
        out += f" [output not checked: {row['check']}]"
    return out
