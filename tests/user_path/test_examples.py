"""Every documented command runs: the README's first command, every config in examples/configs/, and
every script in examples/, each started with ``python ...`` as written, with fewer steps and a smaller
corpus, and each checked for the TensorBoard tags it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from picotron_lightning.testing import run_script

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow

# What each config's TensorBoard logs must hold after 2 steps.
CONFIG_TAGS = {
    "pretrain_3d.yaml": ["train_loss", "train/loss", "throughput/tokens_per_sec", "throughput/mfu", "grad/norm",
                         "memory/host_rss_gb", "pipeline/bubble"],
    "pretrain_dp.yaml": ["train_loss"],
    "pretrain_oom_recovery.yaml": ["train_loss", "throughput/tokens_per_sec"],
    "pretrain_pp_oom_recovery.yaml": ["train_loss", "pipeline/bubble"],
    "pretrain_moe_oom_recovery.yaml": ["train_loss", "moe/load_imbalance"],
    "pretrain_memory_budget.yaml": ["train_loss"],
}
# What a config promises to print (rank 0's log), where it chooses something.
CONFIG_OUTPUT = {
    # The budget, read from a datamodule that builds its datasets in setup(), before Lightning's data hooks.
    "pretrain_memory_budget.yaml": "memory policy 'selective': estimated peak 7.12 MiB <= budget 7.63 MiB",
}


def _scalar_tags(log_root: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    events = list(log_root.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {log_root}"
    for event_dir in {e.parent for e in events}:
        acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_every_config_has_a_check():
    assert sorted(CONFIG_TAGS) == sorted(p.name for p in (EXAMPLES / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", sorted(CONFIG_TAGS))
def test_pretrain_config_runs_as_documented(config, tmp_path):
    """``python examples/pretrain.py fit --config examples/configs/<config>`` (the README's first command for
    pretrain_3d.yaml), with 2 steps and a 200 kB corpus."""
    out = run_script(EXAMPLES / "pretrain.py", "fit", "--config", EXAMPLES / "configs" / config,
                     "--trainer.max_steps=2", "--data.max_bytes=200000", cwd=tmp_path, timeout=900).stdout
    tags = _scalar_tags(tmp_path / "tb_logs")
    missing = [t for t in CONFIG_TAGS[config] if t not in tags]
    assert not missing, (missing, sorted(tags))
    assert "TensorBoard logs are in" in out and "tensorboard --logdir tb_logs" in out, out[-2000:]
    assert CONFIG_OUTPUT.get(config, "") in out, out[-4000:]
    # One copy of each library warning, not one per rank; no FSDP2 view-tensor warning for tensor-parallel units.
    assert "returned a view tensor" not in out, out[-4000:]
    assert out.count("isinstance(treespec, LeafSpec)") <= 1, out[-4000:]


def test_monitoring_example_and_png_renderer(tmp_path):
    # It logs every 5 steps.
    run_script(EXAMPLES / "monitoring.py", "--devices", "2", "--steps", "5", "--root", tmp_path / "logs",
               cwd=tmp_path, timeout=600)
    log_dir = tmp_path / "logs" / "monitoring" / "version_0"
    tags = _scalar_tags(log_dir)
    assert {"train/loss", "throughput/mfu", "grad/norm", "moe/load_imbalance"} <= tags, sorted(tags)
    run_script(EXAMPLES / "render_monitoring_pngs.py", log_dir, tmp_path / "img", cwd=tmp_path, timeout=300)
    assert list((tmp_path / "img").glob("*.png")), "no PNG rendered"


def test_fabric_pipeline_example(tmp_path):
    """``python examples/fabric_pipeline.py`` (pp=2 on 2 processes, a plain Fabric loop), 11 steps."""
    out = run_script(EXAMPLES / "fabric_pipeline.py", "--steps", "11", cwd=tmp_path, timeout=600).stdout
    losses = [float(line.split("loss")[1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and losses[1] < losses[0], out[-2000:]  # steps 0 and 10: it learns
    assert "pipeline_parallel_size=2" in out and "last batch without gradients" in out, out[-2000:]
    assert (tmp_path / "checkpoints" / "fabric_pipeline").is_dir()


def test_every_example_script_is_exercised():
    exercised = {"pretrain.py", "monitoring.py", "render_monitoring_pngs.py", "fabric_pipeline.py"}
    assert exercised == {p.name for p in EXAMPLES.glob("*.py")}
