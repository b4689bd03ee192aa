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


@pytest.mark.parametrize(("arguments", "message"), [
    (("--world-size", "4", "--tp", "2", "--dp-mode", "ddp"), "data_parallel_mode='ddp' cannot reduce tensor-parallel"),
    (("--world-size", "4", "--dp-mode", "hsdp", "--hsdp-shard-size", "3"),
     "hsdp_shard_size=3 must divide data_parallel_size=4; sizes that would work: [1, 2, 4]"),
])
def test_estimate_command_refuses_a_layout_the_strategy_refuses(tmp_path, arguments, message):
    """The estimate answers what the strategy would: a usage error naming the argument and what works (exit 2),
    not an estimate of a layout that cannot run (DDP x tp was estimated) nor a traceback (a bad HSDP size)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "picotron_lightning.memory.estimate", "--micro-batch", "2",
                           "--seq-len", "16", *arguments], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_estimate_command_estimates_hsdp_with_its_shard_groups(tmp_path):
    """``--dp-mode hsdp --hsdp-shard-size 2`` on 4 ranks: parameters sharded over 2 ranks, twice FSDP's share."""
    def params_mib(*arguments: str) -> float:
        out = run_script("picotron_lightning.memory.estimate", "--world-size", "4", "--micro-batch", "2",
                         "--seq-len", "16", *arguments, module=True, cwd=tmp_path, timeout=300).stdout
        row = next(line for line in out.splitlines() if line.strip().startswith("0 "))
        return float(row.split()[4])

    fsdp = params_mib("--dp-mode", "fsdp")
    assert params_mib("--dp-mode", "hsdp", "--hsdp-shard-size", "2") == pytest.approx(2 * fsdp, rel=0.02)
