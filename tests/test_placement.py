"""Placement of tensor-parallel engines: computed requests for TP=1/2/4/8, bundle ordering, and
a real placement group created on the local Ray."""
import pytest

from expo_ray.errors import ExpoError
from expo_ray.evaluate.placement import engines_that_fit, plan_engine, sort_bundles_by_node


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_actor_layout_takes_a_whole_engine(tp):
    p = plan_engine(tp, use_gpu=True)
    assert p.actor_options["num_gpus"] == tp and p.layout == "actor"
    assert p.engine_kwargs()["tensor_parallel_size"] == tp
    assert p.engine_kwargs()["distributed_executor_backend"] == ("mp" if tp > 1 else None)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_bundle_layout_never_gives_the_actor_gpus(tp):
    p = plan_engine(tp, use_gpu=True, layout="bundles")
    assert p.actor_options["num_gpus"] == 0 and p.executor == "ray"
    assert p.bundles == [{"GPU": 1, "CPU": 1}] * tp and p.strategy == "STRICT_PACK"


def test_cpu_engines_and_bad_settings():
    assert plan_engine(2, use_gpu=False, cpus_per_rank=1).actor_options == {"num_gpus": 0, "num_cpus": 2}
    with pytest.raises(ExpoError, match="tensor parallel size 3"):
        plan_engine(3, use_gpu=True)
    with pytest.raises(ExpoError, match="layout"):
        plan_engine(2, use_gpu=True, layout="spread")


def test_bundles_sorted_by_node_and_capacity():
    assert sort_bundles_by_node({0: "b", 1: "a", 2: "b", 3: "a"}) == [0, 2, 1, 3]
    assert engines_that_fit(8, [8, 8, 4]) == 2 and engines_that_fit(4, [8, 8, 4]) == 5
    assert engines_that_fit(2, [], use_gpu=False) == 1


def test_placement_group_is_created_on_real_ray(ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    p = plan_engine(2, use_gpu=False, layout="bundles")
    pg = placement_group(p.bundles, strategy=p.strategy)
    assert pg.wait(timeout_seconds=30)
    remove_placement_group(pg)
