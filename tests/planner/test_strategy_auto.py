"""Sizes left to "auto": the strategy plans them from the model in every rank, before any process group."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from picotron_lightning import Picotron3DFabricStrategy, Picotron3DStrategy
from picotron_lightning.planner import PlanError
from picotron_lightning.testing import run_script, token_data
from tests.parity import RTOL, max_relative_diff, train_reference

SCRIPTS = Path(__file__).parents[1] / "user_path" / "scripts"


def test_auto_sizes_are_accepted_and_checked_before_launch() -> None:
    strategy = Picotron3DStrategy(tensor_parallel_size="auto", pipeline_parallel_size="auto")
    assert strategy.options.layout.needs_plan
    with pytest.raises(PlanError, match="tensor_parallel_size=3 = 3 does not divide the world size 4"):
        Picotron3DStrategy(tensor_parallel_size=3, pipeline_parallel_size="auto")._resolve_layout(4)


def test_fabric_refuses_auto_sizes_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="planned from the model, which Fabric receives only after launch"):
        Picotron3DFabricStrategy(tensor_parallel_size="auto")


@pytest.mark.slow
def test_user_script_with_auto_sizes_trains_with_parity(tmp_path: Path) -> None:
    """``python train.py`` with tensor and pipeline sizes "auto" on 2 processes: the planner chooses, it is
    logged, and the losses match one process (fp32, 1e-4)."""
    steps, micro = 4, 2
    run = {"name": "auto", "model": {"kind": "llama", "config": {"num_layers": 4}},
           "strategy": {"tensor_parallel_size": "auto", "pipeline_parallel_size": "auto"},
           "steps": steps, "micro_batch": micro, "samples": steps * micro * 2}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"devices": 2, "runs": [run]}))
    out = tmp_path / "results.json"
    proc = run_script(SCRIPTS / "train.py", spec, out, timeout=900, cwd=tmp_path)
    assert "picotron3d planner chose" in proc.stdout
    result = json.loads(out.read_text())["auto"]
    sizes = {k: int(v) for k, v in re.findall(r"(\w+_parallel_size)=(\d+)", result["layout"])}
    assert sizes["data_parallel_size"] * sizes["tensor_parallel_size"] * sizes["pipeline_parallel_size"] == 2
    sys.path.insert(0, str(SCRIPTS))
    from user_models import build_module

    dp = sizes["data_parallel_size"]
    data = token_data(run["samples"])
    chunks = 1
    reference = train_reference(build_module(run["model"]), data, steps, micro * dp, chunks=chunks)["losses"]
    assert max_relative_diff(result["losses"], reference) <= RTOL, (result, reference)
