"""How a transfer reports a pretraining checkpoint's per-dataset heads (models/weights.py)."""

from __future__ import annotations

from med3d_ext.models.weights import LoadReport


def test_pretraining_heads_are_said_as_expected_not_as_unexpected():
    """Transferring from a pretrain run's best.pt listed its heads as "unexpected (112) -- in
    the file, not used", the wording of a real mismatch."""
    heads = [f"heads.Task0{i}.{j}.weight" for i in range(1, 4) for j in range(2)]
    r = LoadReport("best.pt", "med3d_ext", 10, "B", loaded=["conv1.weight"],
                   unexpected=heads + ["fc.weight"])
    text = str(r)
    assert "unexpected (1) -- in the file, not used: fc.weight" in text
    assert "6 tensors of the pretraining run's 3 per-dataset heads" in text
    assert "heads.Task01" not in text
    only_heads = str(LoadReport("best.pt", "med3d_ext", 10, "B", unexpected=heads))
    assert "unexpected" not in only_heads and "as expected" in only_heads
