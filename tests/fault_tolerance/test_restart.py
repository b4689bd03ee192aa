"""Under torchrun --max-restarts=1 a rank is SIGKILLed; the group restarts, resumes and trains as if never stopped."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from parity import RTOL, max_relative_diff, train_reference

from picotron_lightning.testing import run_script, token_data

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(Path(__file__).parents[1] / "user_path" / "scripts"))
from user_models import build_module  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = {"kind": "llama", "config": {"num_layers": 2}}


def _torchrun(tmp: Path, spec: dict[str, Any], nproc: int = 2) -> dict[str, Any]:
    (tmp / "spec.json").write_text(json.dumps(spec))
    run_script("torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=1",
               SCRIPTS / "train_resume.py", tmp / "spec.json", tmp, module=True, timeout=600, cwd=tmp)
    return json.loads((tmp / "attempts.json").read_text())


def _trajectory(attempts: dict[str, Any]) -> list[float]:
    """Per-step losses as the run saw them: a later start's steps replace an earlier one's."""
    losses: dict[int, float] = {}
    for attempt in sorted(attempts, key=int):
        losses.update({int(k): v for k, v in attempts[attempt]["losses"].items()})
    return [losses[s] for s in sorted(losses)]


@pytest.mark.parametrize("strategy", [{}, {"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
                         ids=["dp2", "tp2", "pp2"])
def test_killed_rank_resumes_with_the_uninterrupted_trajectory(tmp_path, strategy):
    dp = 2 // strategy.get("tensor_parallel_size", 1) // strategy.get("pipeline_parallel_size", 1)
    # 16 samples, global batch 2*dp: the kill at step 3 (after the step-2 checkpoint) is mid-epoch.
    spec = {"strategy": strategy, "model": MODEL, "steps": 6, "micro_batch": 2, "samples": 16,
            "checkpoint_every": 2, "kill": {"rank": 1, "step": 3}}
    attempts = _torchrun(tmp_path, spec)
    assert set(attempts) == {"0", "1"}, attempts  # the launcher restarted the group once
    assert attempts["1"]["resumed_from"].endswith("step=2.ckpt")
    assert sorted(map(int, attempts["1"]["losses"])) == [3, 4, 5, 6]
    reference = train_reference(build_module(MODEL), token_data(16), 6, 2 * dp)["losses"]
    got = _trajectory(attempts)
    assert max_relative_diff(got, reference) <= RTOL, (got, reference)

