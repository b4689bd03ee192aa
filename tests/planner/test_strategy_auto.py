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
    model = {"kind": "llama", "config": {"num_layers": 4}}
    runs = [  # everything auto (the planner picks data parallelism here); dp fixed to 1 (it must pick tp or pp)
        {"name": "auto", "model": model, "strategy": {"tensor_parallel_size": "auto", "pipeline_parallel_size": "auto"},
         "steps": steps, "micro_batch": micro, "samples": steps * micro * 2},
        {"name": "auto_dp1", "model": model, "strategy": {"data_parallel_size": 1, "tensor_parallel_size": "auto",
                                                          "pipeline_parallel_size": "auto"},
         "steps": steps, "micro_batch": micro, "samples": steps * micro},
    ]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"devices": 2, "runs": runs}))
    out = tmp_path / "results.json"
    proc = run_script(SCRIPTS / "train.py", spec, out, timeout=900, cwd=tmp_path)
    assert proc.stdout.count("picotron3d planner chose") == 2
    sys.path.insert(0, str(SCRIPTS))
    from user_models import build_module

    chosen = []
    for run in runs:
        result = json.loads(out.read_text())[run["name"]]
        sizes = {k: int(v) for k, v in re.findall(r"(\w+_parallel_size)=(\d+)", result["layout"])}
        assert sizes["data_parallel_size"] * sizes["tensor_parallel_size"] * sizes["pipeline_parallel_size"] == 2
        chosen.append(sizes)
        dp = sizes["data_parallel_size"]
        reference = train_reference(build_module(run["model"]), token_data(run["samples"]), steps, micro * dp)["losses"]
        assert max_relative_diff(result["losses"], reference) <= RTOL, (run["name"], result, reference)
    assert chosen[1]["data_parallel_size"] == 1 and 2 in (chosen[1]["tensor_parallel_size"],
                                                          chosen[1]["pipeline_parallel_size"])
