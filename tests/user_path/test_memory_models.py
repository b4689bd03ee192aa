"""Memory management on models the package did not write, from a plain script (``python train.py``, Lightning's
launcher, 2 processes, nothing in the environment).

Hugging Face GPT-2 (``Conv1D`` projections, a fused ``c_attn``, an odd vocabulary of 101, its key/value cache on
by default), tied as GPT-2 ships and untied, and a plain GPT with its own naming, each under every memory policy
(selective, full and every-2nd-block checkpointing, activation offload, FSDP2 CPU offload), a memory budget, and
OOM recovery with an injected OOM: every run's per-step loss against the one-process loop (fp32, 1e-4), and what
took effect (checkpointed blocks, offloaded bytes, the chosen policy, the retry). Checkpointing and OOM recovery
again inside tensor-parallel and pipeline layouts of the same models, and the policies in a plain Fabric loop
(``fabric.launch()``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from picotron_lightning.testing import run_script, token_data
from tests.parity import RTOL, max_relative_diff, train_reference

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from user_models import build_module, vocab_size  # noqa: E402

pytestmark = pytest.mark.slow

STEPS, MICRO, DP = 4, 4, 2
MODELS = {"gpt2": {"kind": "gpt2", "tied": False}, "gpt2_tied": {"kind": "gpt2", "tied": True}, "gpt": {"kind": "gpt"}}
BLOCKS = {"gpt2": 2, "gpt2_tied": 2, "gpt": 4}
POLICIES = {
    "selective": {"activation_checkpointing": "selective"},
    "full": {"activation_checkpointing": "full"},
    "every_2nd_block": {"activation_checkpointing": "full", "checkpoint_every": 2},
    "activation_offload": {"activation_offload": True},
    "cpu_offload": {"cpu_offload": True},
}
# GPT-2 (FSDP2 over 2 ranks, 4 x 16 tokens per rank) is estimated at 2.54 MiB without checkpointing and 2.17
# with selective: a budget between them must choose selective.
GPT2_BUDGET = int(2.35 * 2**20)
OOM_AT = [{"rank": 1, "step": 1, "phase": "backward", "op": 20}]


def _run(name: str, model: str, strategy: dict[str, Any], dp: int = DP, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": MODELS[model], "strategy": strategy, "steps": STEPS, "micro_batch": MICRO,
            "samples": STEPS * MICRO * dp, "dp": dp, **extra}


RUNS = [
    # First: a budget's choice traces on a fake process group, before the launch's real one exists.
    _run("gpt2_budget", "gpt2", {"data_parallel_mode": "fsdp", "memory_budget": GPT2_BUDGET}),
    *(_run(f"{model}_{policy}", model, {"data_parallel_mode": "fsdp", "memory": memory})
      for model in MODELS for policy, memory in POLICIES.items()),
    *(_run(f"{model}_oom_recovery", model, {"data_parallel_mode": "ddp", "memory": {"oom_recovery": True}},
           inject_oom=OOM_AT) for model in MODELS),
    # A later fit in the same script: its process group exists, so the budget chooses with a real step on it.
    _run("gpt2_budget_later_fit", "gpt2", {"data_parallel_mode": "fsdp", "memory_budget": GPT2_BUDGET}),
]


# Checkpointing and OOM recovery inside tensor-parallel and pipeline layouts of the same models (2 ranks, dp=1;
# each pipeline rank reports its own stage's checkpointed blocks).
TP2, PP2 = {"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}
LAYOUT_RUNS = [
    _run("tp2_gpt2_selective_oom_recovery", "gpt2", {**TP2, "memory": {"activation_checkpointing": "selective",
                                                                       "oom_recovery": True}},
         dp=1, inject_oom=OOM_AT, blocks=2),
    _run("pp2_gpt2_selective", "gpt2", {**PP2, "memory": {"activation_checkpointing": "selective"}}, dp=1, blocks=1),
    _run("pp2_gpt2_tied_full", "gpt2_tied", {**PP2, "memory": {"activation_checkpointing": "full"}}, dp=1, blocks=1),
    _run("pp2_gpt_selective", "gpt", {**PP2, "memory": {"activation_checkpointing": "selective"}}, dp=1, blocks=2),
    _run("pp2_gpt2_oom_recovery", "gpt2", {**PP2, "memory": {"oom_recovery": True}}, dp=1,
         inject_oom=[{"rank": 1, "step": 1, "phase": "backward", "op": 30}], blocks=0),
]

# The same policies in a plain Fabric loop (GPT-2 and the plain GPT; Fabric takes no OOM recovery), and a budget:
# `fabric.strategy.choose_memory_policy(model, batch)` before the first launch (fake tensors), and in a later run
# of the same script (its process group exists: a real step per policy on it).
FABRIC_RUNS = [
    _run("fabric_gpt2_budget", "gpt2", {"data_parallel_mode": "fsdp", "memory_budget": GPT2_BUDGET}),
    *(_run(f"fabric_{model}_{policy}", model, {"data_parallel_mode": "fsdp", "memory": memory})
      for model in ("gpt2", "gpt") for policy, memory in POLICIES.items()),
    _run("fabric_gpt2_budget_later_run", "gpt2", {"data_parallel_mode": "fsdp", "memory_budget": GPT2_BUDGET}),
]


def _launch(tmp: Path, spec: dict[str, Any]) -> dict[str, Any]:
    spec_file, out = tmp / "spec.json", tmp / "results.json"
    spec_file.write_text(json.dumps(spec))
    output = run_script(SCRIPTS / "train.py", spec_file, out, timeout=900, cwd=tmp).stdout
    return {**json.loads(out.read_text()), "stdout": output}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("memory_models"), {"devices": 2, "runs": RUNS})


@pytest.fixture(scope="module")
def layouts_launched(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("memory_models_layouts"), {"devices": 2, "runs": LAYOUT_RUNS})


@pytest.fixture(scope="module")
def fabric_launched(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("memory_models_fabric"), {"devices": 2, "api": "fabric",
                                                                     "runs": FABRIC_RUNS})


def _assert_parity(results: dict[str, Any], run: dict[str, Any], shuffle: bool = True) -> None:
    got = results[run["name"]]["losses"]
    data = token_data(run["samples"], vocab_size=vocab_size(run["model"]))
    ref = train_reference(build_module(run["model"]), data, STEPS, MICRO * run["dp"], shuffle=shuffle)["losses"]
    assert len(got) == STEPS, (run["name"], got)
    assert max_relative_diff(got, ref) <= RTOL, (run["name"], got, ref)


def _assert_applied(applied: dict[str, Any], model: str, policy: str) -> None:
    checkpointing = POLICIES[policy].get("activation_checkpointing", "none")
    every = POLICIES[policy].get("checkpoint_every", 1)
    expected_blocks = 0 if checkpointing == "none" else -(-BLOCKS[model] // every)
    assert applied["checkpointed_blocks"] == expected_blocks, applied
    assert (applied["offloaded_activation_bytes"] > 0) == (policy == "activation_offload"), applied
    assert applied["cpu_offload"] == (policy == "cpu_offload"), applied


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("policy", POLICIES)
def test_memory_policy_on_a_model_users_bring(launched, model: str, policy: str) -> None:
    run = next(r for r in RUNS if r["name"] == f"{model}_{policy}")
    _assert_parity(launched, run)
    _assert_applied(launched[run["name"]]["memory"], model, policy)


FABRIC_POLICY_RUNS = [r for r in FABRIC_RUNS if "budget" not in r["name"]]


@pytest.mark.parametrize("run", FABRIC_POLICY_RUNS, ids=[r["name"] for r in FABRIC_POLICY_RUNS])
def test_memory_policy_in_a_fabric_loop(fabric_launched, run: dict[str, Any]) -> None:
    _assert_parity(fabric_launched, run, shuffle=False)  # Fabric's sampler keeps the loader's order
    model, policy = run["name"].removeprefix("fabric_").split("_", 1)
    _assert_applied(fabric_launched[run["name"]]["memory"], model, policy)


@pytest.mark.parametrize("model", MODELS)
def test_oom_recovery_on_a_model_users_bring(launched, model: str) -> None:
    run = next(r for r in RUNS if r["name"] == f"{model}_oom_recovery")
    _assert_parity(launched, run)
    assert launched[run["name"]]["oom_events"] == [
        {"step": 1, "batch_idx": 1, "attempt": 1, "ranks": [1], "split": 1, "new_split": 2}], launched[run["name"]]


@pytest.mark.parametrize("name", ["gpt2_budget", "gpt2_budget_later_fit"])
def test_memory_budget_on_hugging_face_gpt2(launched, name: str) -> None:
    """The first fit chooses on fake tensors; a later fit in the same script with a real step on its group."""
    run = next(r for r in RUNS if r["name"] == name)
    _assert_parity(launched, run)
    applied = launched[run["name"]]["memory"]
    assert applied["policy"] == "selective" and applied["checkpointed_blocks"] == BLOCKS["gpt2"], applied
    assert "none needs" in applied["reason"], applied
    how = "a real step on the process group" if name.endswith("later_fit") else "fake tensors"
    assert "memory policy 'selective'" in launched["stdout"] and f"(estimated with {how})" in launched["stdout"]


@pytest.mark.parametrize("name", ["fabric_gpt2_budget", "fabric_gpt2_budget_later_run"])
def test_memory_budget_in_a_fabric_loop(fabric_launched, name: str) -> None:
    """`choose_memory_policy(model, batch)` before `fabric.launch()`: the first run chooses on fake tensors, a
    later run in the same script with a real step on its process group; both `selective`, as the Trainer does."""
    run = next(r for r in FABRIC_RUNS if r["name"] == name)
    _assert_parity(fabric_launched, run, shuffle=False)
    applied = fabric_launched[run["name"]]["memory"]
    assert applied["policy"] == "selective" and applied["checkpointed_blocks"] == BLOCKS["gpt2"], applied
    assert "none needs" in applied["reason"], applied
    how = "a real step on the process group" if name.endswith("later_run") else "fake tensors"
    assert f"(estimated with {how})" in fabric_launched["stdout"], fabric_launched["stdout"][-3000:]


@pytest.mark.parametrize("run", LAYOUT_RUNS, ids=[r["name"] for r in LAYOUT_RUNS])
def test_memory_options_inside_tensor_and_pipeline_layouts(layouts_launched, run: dict[str, Any]) -> None:
    _assert_parity(layouts_launched, run)
    result = layouts_launched[run["name"]]
    assert result["memory"]["checkpointed_blocks"] == run["blocks"], result
    if run.get("inject_oom"):
        assert result["oom_events"] == [
            {"step": 1, "batch_idx": 1, "attempt": 1, "ranks": [1], "split": 1, "new_split": 2}], result
