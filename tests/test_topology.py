"""ParallelLayout: every validation path and the rank <-> coordinate mapping (no processes needed)."""

import itertools

import pytest

from picotron_lightning.topology import LayoutError, ParallelLayout


def test_auto_fills_the_remaining_factor():
    layout = ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=2).resolve(8)
    assert (layout.pp, layout.dp, layout.tp) == (2, 2, 2)
    assert layout.world_size == 8


def test_explicit_sizes_must_multiply_to_world_size():
    with pytest.raises(LayoutError, match=r"data_parallel_size=3 .* world size 2.*data_parallel_size=2 would work"):
        ParallelLayout(data_parallel_size=3).resolve(2)


def test_model_parallel_must_divide_world_size():
    with pytest.raises(LayoutError, match=r"tensor_parallel_size=3 x pipeline_parallel_size=1 = 3 does not divide"
                                          r" the world size 8.*\[1, 2, 4, 8\]"):
        ParallelLayout(tensor_parallel_size=3).resolve(8)


def test_expert_parallel_must_divide_data_parallel():
    with pytest.raises(LayoutError, match=r"expert_parallel_size=3 must divide data_parallel_size=4.*\[1, 2, 4\]"):
        ParallelLayout(expert_parallel_size=3).resolve(4)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"data_parallel_size": 0}, "data_parallel_size"), ({"tensor_parallel_size": -1}, "tensor_parallel_size"),
     ({"pipeline_parallel_size": 1.5}, "pipeline_parallel_size"),
     ({"expert_parallel_size": "2"}, "expert_parallel_size"),
     ({"data_parallel_size": True}, "data_parallel_size")],
)
def test_sizes_must_be_positive_integers(kwargs, name):
    with pytest.raises(LayoutError, match=name):
        ParallelLayout(**kwargs)


def test_context_parallel_is_reserved():
    with pytest.raises(LayoutError, match="context_parallel_size"):
        ParallelLayout(context_parallel_size=2)


def test_unresolved_layout_refuses_coordinates():
    with pytest.raises(LayoutError, match="resolve"):
        ParallelLayout().coordinates(0)


def test_rank_out_of_range():
    with pytest.raises(LayoutError, match="outside"):
        ParallelLayout(data_parallel_size=2).resolve(2).coordinates(2)


def test_tp_is_innermost_and_pp_outermost():
    layout = ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=2, expert_parallel_size=2).resolve(16)
    assert layout.dp == 4
    assert layout.coordinates(0) == (0, 0, 0, 0, 0)
    assert layout.coordinates(1) == (0, 0, 1, 0, 0)  # neighbours share tp
    assert layout.coordinates(2) == (0, 1, 0, 1, 0)  # next dp rank, next ep rank
    assert layout.coordinates(4) == (0, 2, 0, 0, 1)  # dp 2 -> second expert replica
    assert layout.coordinates(8) == (1, 0, 0, 0, 0)  # second half is the second stage


def test_coordinates_round_trip_and_cover_the_grid():
    layout = ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=3).resolve(12)
    seen = set()
    for rank in range(12):
        c = layout.coordinates(rank)
        assert layout.rank_of(c.pp, c.dp, c.tp) == rank
        seen.add((c.pp, c.dp, c.tp))
    assert seen == set(itertools.product(range(3), range(2), range(2)))


def test_mesh_matches_coordinates():
    """The DeviceMesh layout agrees with the arithmetic (built over a fake world of 8 on one process)."""
    import torch
    import torch.distributed as dist

    layout = ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=2).resolve(8)
    if dist.is_initialized():
        pytest.skip("process group already initialised")
    # The "fake" backend is torch's own single-process stand-in: it builds real groups, runs no collectives.
    dist.init_process_group("fake", store=dist.HashStore(), rank=5, world_size=8)
    try:
        mesh = layout.build_device_mesh("cpu")
        assert mesh.mesh_dim_names == ("pp", "dp", "tp")
        expected = torch.tensor([[[layout.rank_of(p, d, t) for t in range(2)] for d in range(2)] for p in range(2)])
        assert torch.equal(mesh.mesh, expected)
        c = layout.coordinates(5)
        assert (mesh.get_local_rank("pp"), mesh.get_local_rank("dp"), mesh.get_local_rank("tp")) == (c.pp, c.dp, c.tp)
        assert layout.build_expert_mesh("cpu").mesh_dim_names == ("pp", "ep_replicate", "ep", "tp")
    finally:
        dist.destroy_process_group()
