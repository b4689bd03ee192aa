"""The user's path: ``python train.py`` with nothing in the environment, ranks started by Lightning.

Each fixture is one launch of ``scripts/train.py`` (several layouts run one after another inside it,
as several ``fit`` calls in one script do), started the way users start it:

* Lightning's own launcher (``start_method="popen"``, the default) on 2 and on 8 processes,
* ``start_method="spawn"``,
* ``fabric.launch()`` from a plain Fabric script,
* ``torchrun --standalone`` (the real command, not variables set by hand),
* two "nodes" of Lightning's launcher (``num_nodes=2``; each node's script started with NODE_RANK,
  MASTER_ADDR and MASTER_PORT, as a user does on each machine).

Every layout's per-step global-batch loss is compared with the one-process reference loop of
``tests/parity.py`` (fp32, relative 1e-4 per step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from picotron_lightning.testing import free_port, run_script, token_data, user_environment
from tests.fitting import fit_and_record
from tests.parity import RTOL, max_relative_diff, train_reference

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from user_models import build_module, vocab_size  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 4
MICRO = 2


def _run(name: str, dp: int, model: dict[str, Any] | None = None, strategy: dict[str, Any] | None = None,
         **extra: Any) -> dict[str, Any]:
    model = model or {"kind": "llama", "config": {"num_layers": 4}}
    return {"name": name, "model": model, "strategy": strategy or {}, "steps": STEPS, "micro_batch": MICRO,
            "samples": STEPS * MICRO * dp, **extra}


def _launch(tmp: Path, spec: dict[str, Any], timeout: float = 900.0, **kwargs: Any) -> dict[str, Any]:
    spec_file, out = tmp / "spec.json", tmp / "results.json"
    spec_file.write_text(json.dumps(spec))
    run_script(SCRIPTS / "train.py", spec_file, out, timeout=timeout, cwd=tmp, **kwargs)
    return json.loads(out.read_text())


def _reference(run: dict[str, Any], dp: int, shuffle: bool = True) -> list[float]:
    """One process, the same global batch (micro_batch x dp), the same tokens, the plain loop."""
    chunks = 1
    if run["model"].get("kind") == "moe" and run["strategy"].get("pipeline_parallel_size", 1) > 1:
        chunks = run["micro_batch"]  # the MoE auxiliary loss is per pipeline microbatch
    data = token_data(run["samples"], vocab_size=vocab_size(run["model"]))
    return train_reference(build_module(run["model"]), data, run["steps"], run["micro_batch"] * dp,
                           shuffle=shuffle, chunks=chunks)["losses"]


def _assert_parity(results: dict[str, Any], run: dict[str, Any], dp: int, shuffle: bool = True) -> None:
    got = results[run["name"]]["losses"]
    ref = _reference(run, dp, shuffle)
    assert len(got) == run["steps"], (run["name"], got)
    assert max_relative_diff(got, ref) <= RTOL, (run["name"], results[run["name"]].get("layout"), got, ref)


# --------------------------------------------------------------------------- Lightning's launcher, 2 processes
RUNS_2 = [
    _run("dp_fsdp", 2, strategy={"data_parallel_mode": "fsdp"}),
    _run("dp_ddp", 2, strategy={"data_parallel_mode": "ddp"}),
    _run("tp2", 1, strategy={"tensor_parallel_size": 2}),
    _run("tp2_gpt", 1, model={"kind": "gpt"}, strategy={"tensor_parallel_size": 2}),
    _run("pp2", 1, strategy={"pipeline_parallel_size": 2}),
    # Tied input/output embeddings (as Llama 3.2 1B/3B ship): each stage end keeps a copy.
    _run("pp2_tied", 1, model={"kind": "llama", "config": {"num_layers": 4, "tie_embeddings": True}},
         strategy={"pipeline_parallel_size": 2}),
    _run("ep2", 2, model={"kind": "moe"}, strategy={"expert_parallel_size": 2}),
]


@pytest.fixture(scope="module")
def lightning2(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("lightning2"), {"devices": 2, "runs": RUNS_2})


@pytest.mark.parametrize("run", RUNS_2, ids=[r["name"] for r in RUNS_2])
def test_lightning_launcher_2_processes(lightning2, run):
    dp = 2 // run["strategy"].get("tensor_parallel_size", 1) // run["strategy"].get("pipeline_parallel_size", 1)
    assert lightning2[run["name"]]["world_size"] == 2
    _assert_parity(lightning2, run, dp)


# --------------------------------------------------------------------------- models users bring, tp=2
# Hugging Face GPT-2 (Conv1D projections, fused c_attn) with an odd vocabulary, tied as GPT-2 ships
# (the vocabulary then stays whole) and untied (sharded unevenly, 101 -> 51 + 50), and a plain GPT whose
# vocabulary (97) and MLP width (129) tp does not divide.
RUNS_MODELS = [
    _run("tp2_gpt2", 1, model={"kind": "gpt2", "tied": False}, strategy={"tensor_parallel_size": 2}),
    _run("tp2_gpt2_tied", 1, model={"kind": "gpt2", "tied": True}, strategy={"tensor_parallel_size": 2}),
    _run("tp2_gpt_odd", 1, model={"kind": "gpt", "vocab": 97, "ffn": 129}, strategy={"tensor_parallel_size": 2}),
]


@pytest.fixture(scope="module")
def models_users_bring(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("models"), {"devices": 2, "runs": RUNS_MODELS})


@pytest.mark.parametrize("run", RUNS_MODELS, ids=[r["name"] for r in RUNS_MODELS])
def test_models_users_bring_tp2(models_users_bring, run):
    assert models_users_bring[run["name"]]["world_size"] == 2
    _assert_parity(models_users_bring, run, dp=1)


# --------------------------------------------------------------------------- Lightning's launcher, 8 processes
# Full 3D (pp=2 x dp=2 x tp=2) for the reference Llama and for a GPT only the data-flow detector can
# plan (each pipeline stage applies the plan's entries for the blocks it holds), experts with tensor
# parallelism, and a 3D checkpoint resumed by a second fit in the same script.
THREE_D = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2}
RUNS_8 = [
    _run("3d_llama", 2, strategy=THREE_D),
    _run("3d_gpt", 2, model={"kind": "gpt"}, strategy=THREE_D),
    _run("ep2_tp2", 4, model={"kind": "moe"}, strategy={"expert_parallel_size": 2, "tensor_parallel_size": 2}),
    # One global batch per epoch (dp=2 x micro 2 = 4 samples), so the resume is at an epoch boundary.
    {**_run("3d_checkpointed", 2, strategy=THREE_D), "samples": 4, "checkpoint_every": 2},
    {**_run("3d_resumed", 2, strategy=THREE_D), "samples": 4, "resume": "3d_checkpointed@2"},
]


@pytest.fixture(scope="module")
def lightning8(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("lightning8"), {"devices": 8, "runs": RUNS_8}, timeout=1200)


@pytest.mark.parametrize("run", RUNS_8[:3], ids=[r["name"] for r in RUNS_8[:3]])
def test_lightning_launcher_8_processes(lightning8, run):
    s = run["strategy"]
    dp = 8 // s.get("tensor_parallel_size", 1) // s.get("pipeline_parallel_size", 1)
    assert lightning8[run["name"]]["world_size"] == 8
    _assert_parity(lightning8, run, dp)


def test_3d_checkpoint_resumes_where_it_stopped(lightning8):
    full = lightning8["3d_checkpointed"]["losses"]
    resumed = lightning8["3d_resumed"]["losses"]
    assert len(full) == STEPS and len(resumed) == STEPS - 2, (full, resumed)
    assert max_relative_diff(resumed, full[2:]) <= RTOL, (resumed, full)
    _assert_parity(lightning8, RUNS_8[3], dp=2)


# --------------------------------------------------------------------------- the traced split, 4 processes
# A GPT whose blocks pass two tensors to each other (hidden state and a running sum the head reads):
# the traced split carries both across the stage boundary. pp=2 x dp=2, the stages as replicas, and
# sharded with FSDP2 (the traced graphs run over FSDP2's gathered parameters).
TRACED = {"pipeline_parallel_size": 2, "pipeline_split": "trace"}
RUNS_TRACED = [_run("trace_two_stream_pp2_dp2", 2, model={"kind": "two_stream"}, strategy=TRACED),
               _run("trace_two_stream_pp2_dp2_fsdp", 2, model={"kind": "two_stream"},
                    strategy={**TRACED, "data_parallel_mode": "fsdp"}),
               # and pp=2 x tp=2: the traced stages run each rank's shards between the Megatron operators
               _run("trace_two_stream_pp2_tp2", 1, model={"kind": "two_stream"},
                    strategy={**TRACED, "tensor_parallel_size": 2})]


@pytest.fixture(scope="module")
def traced4(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("traced4"), {"devices": 4, "runs": RUNS_TRACED})


@pytest.mark.parametrize("run", RUNS_TRACED, ids=[r["name"] for r in RUNS_TRACED])
def test_traced_split_with_data_and_tensor_parallelism_from_a_plain_script(traced4, run):
    result = traced4[run["name"]]
    dp = 1 if run["strategy"].get("tensor_parallel_size", 1) > 1 else 2
    mode = "none" if dp == 1 else "fsdp" if run["strategy"].get("data_parallel_mode") == "fsdp" else "ddp"
    assert result["world_size"] == 4 and result["data_parallel_mode"] == mode, result
    _assert_parity(traced4, run, dp=dp)


# The reference MoE Llama (tiny-moe) with the traced split at pp=2 from a plain script: each MoELayer is one
# opaque op in the traced graph, recomputed in backward (parallel/pipeline_parallel/traced_moe.py). With the
# monitoring callbacks: the routing statistics reach TensorBoard as with the structural split.
RUN_TRACED_MOE = _run("trace_moe_pp2", 1, model={"kind": "moe"}, strategy=TRACED, monitoring=True)


def test_traced_split_with_moe_layers_from_a_plain_script(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = _launch(tmp_path, {"devices": 2, "runs": [RUN_TRACED_MOE]})
    assert results[RUN_TRACED_MOE["name"]]["world_size"] == 2
    _assert_parity(results, RUN_TRACED_MOE, dp=1)
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    assert "moe/load_imbalance" in set(acc.Tags()["scalars"]), sorted(acc.Tags()["scalars"])


def test_structural_split_refuses_a_second_stream_between_blocks(tmp_path):
    """The same two-stream GPT with the default (structural) split at pp=2: it carries one tensor across the
    boundary, so the running sum would restart from zeros on stage 2. It trained 9e-4 off one process before
    this check; now the run stops on its first step with a message naming the traced split."""
    run = _run("structural_two_stream_pp2", 1, model={"kind": "two_stream"}, strategy={"pipeline_parallel_size": 2})
    with pytest.raises(RuntimeError) as failed:
        _launch(tmp_path, {"devices": 2, "runs": [run]}, timeout=300)
    message = str(failed.value)
    assert "PipelineSplitError" in message and "passes one tensor (the hidden state) between stages" in message, \
        message[-3000:]
    assert 'pipeline_split="trace"' in message, message[-3000:]


# --------------------------------------------------------------------------- precision plugin and monitoring
BF16_MODEL = {"kind": "llama", "config": {"num_layers": 4}, "lr": 3e-3}


@pytest.fixture(scope="module")
def with_plugins(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("plugins")
    # bf16 asked for explicitly: "auto" picks fp32 on CPUs without native bf16 (no avx512_bf16/amx).
    runs = [_run("adaptive_bf16", 2, model=BF16_MODEL, precision={"mode": "bf16"}),
            _run("monitored", 2, model={"kind": "moe"}, monitoring=True)]
    return tmp, _launch(tmp, {"devices": 2, "runs": runs})


def _global_order(data: torch.Tensor) -> torch.Tensor:
    """The samples in the order Lightning's DistributedSampler hands them out (seed 0, first epoch)."""
    return data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))]


def test_precision_plugin_matches_one_process_with_the_plugin(with_plugins):
    from torch.utils.data import DataLoader

    from picotron_lightning import AdaptivePrecision

    _, results = with_plugins
    data = _global_order(token_data(STEPS * MICRO * 2))
    losses = fit_and_record(build_module(BF16_MODEL), DataLoader(list(data), batch_size=4),
                            plugins=[AdaptivePrecision(mode="bf16")], max_steps=STEPS).losses
    got = results["adaptive_bf16"]
    assert got["precision_mode"] == "bf16"
    # bf16 rounds differently on per-rank matmul shapes than in one process: a bf16 tolerance, not fp32's.
    assert max_relative_diff(got["losses"], losses) <= 1e-3, (got["losses"], losses)


def test_monitoring_callbacks_write_their_tensorboard_tags(with_plugins):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, results = with_plugins
    _assert_parity(results, _run("monitored", 2, model={"kind": "moe"}), dp=2)
    events = list((tmp / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "throughput/tokens_per_sec", "throughput/mfu", "grad/norm", "memory/host_rss_gb",
                "moe/load_imbalance"):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(t.startswith("weights/") for t in acc.Tags()["histograms"])


# --------------------------------------------------------------------------- torch.compile per block
# Each block compiled (inductor) after tensor parallelism and checkpointing, before data parallelism;
# parity against the eager one-process loop at fp32 1e-4.
COMPILE_RUNS = [
    _run("compile_ddp", 2, strategy={"compile": True, "data_parallel_mode": "ddp"}),
    _run("compile_fsdp_selective", 2, strategy={"compile": True, "data_parallel_mode": "fsdp",
                                                "memory": {"activation_checkpointing": "selective"}}),
    _run("compile_pp2", 1, strategy={"compile": True, "pipeline_parallel_size": 2}),
    # tp: the sharded linears run eagerly between the compiled parts (parallel/compile.py)
    _run("compile_tp2", 1, strategy={"compile": True, "tensor_parallel_size": 2}),
    _run("compile_tp2_no_sp", 1, strategy={"compile": True, "tensor_parallel_size": 2, "sequence_parallel": False}),
    _run("compile_bf16", 2, model=BF16_MODEL, strategy={"compile": True}, precision={"mode": "bf16"}),
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("compiled"), {"devices": 2, "runs": COMPILE_RUNS}, timeout=1800)


EAGER_ONE_PROCESS = [r for r in COMPILE_RUNS if "precision" not in r]


@pytest.mark.parametrize("run", EAGER_ONE_PROCESS, ids=[r["name"] for r in EAGER_ONE_PROCESS])
def test_compiled_blocks_match_eager_one_process(compiled, run):
    blocks_per_rank = 4 // run["strategy"].get("pipeline_parallel_size", 1)
    assert compiled[run["name"]]["compiled_blocks"] == blocks_per_rank, compiled[run["name"]]
    dp = 2 // run["strategy"].get("tensor_parallel_size", 1) // run["strategy"].get("pipeline_parallel_size", 1)
    _assert_parity(compiled, run, dp)


# Compiled blocks with tensor parallelism combined: FSDP2 over the tp-sharded blocks, and tp pipeline stages.
COMPILE_RUNS_4 = [
    _run("compile_dp2_tp2_fsdp", 2, strategy={"compile": True, "tensor_parallel_size": 2,
                                              "data_parallel_mode": "fsdp"}),
    _run("compile_pp2_tp2", 1, strategy={"compile": True, "tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
]


@pytest.fixture(scope="module")
def compiled4(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("compiled4"), {"devices": 4, "runs": COMPILE_RUNS_4}, timeout=1800)


@pytest.mark.parametrize("run", COMPILE_RUNS_4, ids=[r["name"] for r in COMPILE_RUNS_4])
def test_compiled_tensor_parallel_blocks_with_fsdp_and_pipeline_stages(compiled4, run):
    pp = run["strategy"].get("pipeline_parallel_size", 1)
    assert compiled4[run["name"]]["compiled_blocks"] == 4 // pp, compiled4[run["name"]]
    _assert_parity(compiled4, run, dp=2 if run["strategy"].get("data_parallel_mode") else 1)


def test_compiled_blocks_with_the_precision_plugin(compiled):
    from torch.utils.data import DataLoader

    from picotron_lightning import AdaptivePrecision

    data = _global_order(token_data(STEPS * MICRO * 2))
    eager = fit_and_record(build_module(BF16_MODEL), DataLoader(list(data), batch_size=4),
                           plugins=[AdaptivePrecision(mode="bf16")], max_steps=STEPS).losses
    got = compiled["compile_bf16"]
    assert got["precision_mode"] == "bf16" and got["compiled_blocks"] == 4, got
    assert max_relative_diff(got["losses"], eager) <= 1e-3, (got["losses"], eager)


# --------------------------------------------------------------------------- other ways to start the ranks
def test_fabric_launch_from_a_plain_script(tmp_path):
    runs = [_run("fabric_dp", 2), _run("fabric_tp2", 1, strategy={"tensor_parallel_size": 2})]
    results = _launch(tmp_path, {"devices": 2, "api": "fabric", "runs": runs})
    for run, dp in zip(runs, (2, 1), strict=True):
        _assert_parity(results, run, dp, shuffle=False)  # Fabric's sampler keeps the loader's order


# Pipeline parallelism in a Fabric loop: `forward_backward(fabric, model, x, y, loss_fn)` in place of the
# forward and `fabric.backward`, every schedule at pp=2 (pp x dp x tp in the 8-process launch below).
FABRIC_PP = [
    _run(f"fabric_pp2_{schedule}", 1, strategy={"pipeline_parallel_size": 2, "pipeline_schedule": schedule},
         forward_backward=True, try_direct_call=True)
    for schedule in ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv")
] + [_run("fabric_dp2_forward_backward", 2, forward_backward=True),
     # the stages cut by torch.export run through the same forward_backward
     _run("fabric_pp2_trace", 1, strategy={"pipeline_parallel_size": 2, "pipeline_split": "trace"},
          forward_backward=True)]


@pytest.fixture(scope="module")
def fabric_pp(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("fabric_pp"), {"devices": 2, "api": "fabric", "runs": FABRIC_PP})


@pytest.mark.parametrize("run", FABRIC_PP, ids=[r["name"] for r in FABRIC_PP])
def test_fabric_pipeline_schedules(fabric_pp, run):
    dp = 2 // run["strategy"].get("pipeline_parallel_size", 1)
    _assert_parity(fabric_pp, run, dp, shuffle=False)
    if run.get("try_direct_call"):  # rank 0 holds the first stage only: model(x) is refused with the fix
        assert "picotron_lightning.forward_backward(fabric, model" in fabric_pp[run["name"]]["direct_call_error"]


# pp x dp x tp = 2 x 2 x 2 in a Fabric loop, with fabric.clip_gradients, and fabric.save / fabric.load:
# a run saved after step 2 is resumed by a second run in the same script, at another layout (pp2 x dp4).
FABRIC_3D = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2}
FABRIC_8 = [
    _run("fabric_3d", 2, strategy=FABRIC_3D, forward_backward=True, clip=0.5),
    _run("fabric_3d_saved", 2, strategy=FABRIC_3D, forward_backward=True, save_at=2),
    # dp4 x one sample per rank (one microbatch: gpipe): the same global batches, in the same order, as dp2 x two.
    {**_run("fabric_3d_resumed", 4, strategy={"pipeline_parallel_size": 2, "pipeline_schedule": "gpipe"},
            forward_backward=True,
            resume="fabric_3d_saved@2"), "micro_batch": 1, "samples": STEPS * MICRO * 2},
    # the same 3D layout with the stages cut by torch.export (data parallelism as replicas)
    _run("fabric_3d_trace", 2, strategy={**FABRIC_3D, "pipeline_split": "trace"}, forward_backward=True),
]


@pytest.fixture(scope="module")
def fabric8(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("fabric8"), {"devices": 8, "api": "fabric", "runs": FABRIC_8},
                   timeout=1200)


def test_fabric_3d_with_clipping(fabric8):
    run = FABRIC_8[0]
    got = fabric8[run["name"]]["losses"]
    data = token_data(run["samples"])
    ref = train_reference(build_module(run["model"]), data, run["steps"], run["micro_batch"] * 2, clip=0.5,
                          shuffle=False)["losses"]
    assert fabric8[run["name"]]["world_size"] == 8
    assert max_relative_diff(got, ref) <= RTOL, (got, ref)


def test_fabric_3d_save_and_load_at_another_layout(fabric8):
    saved, resumed = fabric8["fabric_3d_saved"]["losses"], fabric8["fabric_3d_resumed"]["losses"]
    assert len(saved) == STEPS and len(resumed) == STEPS - 2, (saved, resumed)
    _assert_parity(fabric8, FABRIC_8[1], dp=2, shuffle=False)
    assert fabric8["fabric_3d_resumed"]["layout"] != fabric8["fabric_3d_saved"]["layout"]
    assert max_relative_diff(resumed, saved[2:]) <= RTOL, (resumed, saved)


def test_fabric_3d_with_the_traced_split(fabric8):
    assert fabric8["fabric_3d_trace"]["world_size"] == 8
    _assert_parity(fabric8, FABRIC_8[3], dp=2, shuffle=False)


def test_spawn_start_method(tmp_path):
    run = _run("spawn_tp2", 1, strategy={"tensor_parallel_size": 2})
    _assert_parity(_launch(tmp_path, {"devices": 2, "start_method": "spawn", "runs": [run]}), run, 1)


def test_torchrun(tmp_path):
    run = _run("torchrun_tp2_dp2", 2, strategy={"tensor_parallel_size": 2})
    spec_file, out = tmp_path / "spec.json", tmp_path / "results.json"
    spec_file.write_text(json.dumps({"devices": 4, "runs": [run]}))
    run_script("torch.distributed.run", "--standalone", "--nproc-per-node=4", SCRIPTS / "train.py", spec_file, out,
               module=True, timeout=900, cwd=tmp_path)
    results = json.loads(out.read_text())
    assert results[run["name"]]["world_size"] == 4
    _assert_parity(results, run, 2)


def test_two_nodes_of_lightning_launcher(tmp_path):
    """num_nodes=2 x devices=2: the script started once per node, as a user does on each machine."""
    import subprocess

    run = _run("nodes_tp2_dp2", 2, strategy={"tensor_parallel_size": 2})
    spec_file, out = tmp_path / "spec.json", tmp_path / "results.json"
    spec_file.write_text(json.dumps({"devices": 2, "num_nodes": 2, "runs": [run]}))
    port = str(free_port())
    node1 = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "train.py"), str(spec_file), str(tmp_path / "node1.json")], cwd=tmp_path,
        env=user_environment(NODE_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        run_script(SCRIPTS / "train.py", spec_file, out, timeout=900, cwd=tmp_path,
                   env=user_environment(NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        node1_output, _ = node1.communicate(timeout=120)
        assert node1.returncode == 0, node1_output[-4000:]
    finally:
        if node1.poll() is None:
            node1.kill()
    results = json.loads(out.read_text())
    assert results[run["name"]]["world_size"] == 4
    _assert_parity(results, run, 2)
