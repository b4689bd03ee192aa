"""The documented command, ``python -m picotron_lightning.memory.estimate``, runs and prints one row per rank."""

from __future__ import annotations

import pytest

from picotron_lightning.testing import run_script


def test_estimate_command_prints_a_table_per_checkpointing_mode(tmp_path):
    out = run_script("picotron_lightning.memory.estimate", "--preset", "tiny", "--world-size", "2",
                     "--micro-batch", "2", "--seq-len", "16", "--checkpointing", "none,full", "--all-ranks",
                     module=True, cwd=tmp_path, timeout=300).stdout
    assert out.count("checkpointing=none") == 1 and out.count("checkpointing=full") == 1, out
    rows = [line for line in out.splitlines() if line.strip().split(" ")[0] in ("0", "1")]
    assert len(rows) == 4, out  # ranks 0 and 1, for each of the two modes


@pytest.mark.slow
def test_estimate_command_charges_worst_case_routing_under_expert_parallelism(tmp_path):
    out = run_script("picotron_lightning.memory.estimate", "--preset", "tiny-moe", "--world-size", "2", "--ep", "2",
                     "--micro-batch", "2", "--seq-len", "8", "--real", module=True, cwd=tmp_path, timeout=300).stdout
    assert "ep=2" in out, out
    rows = [line for line in out.splitlines() if line.strip().split(" ")[0] in ("0", "1")]
    assert len(rows) == 2 and all(row.endswith("MoE routing worst case") for row in rows), out
