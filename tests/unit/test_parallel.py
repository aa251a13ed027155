"""Multi-device replicas per deviceType (optimizers/parallel.py): the placement group Serve
reserves for one replica and the arguments vLLM gets, from configs/hardware.yaml."""

from __future__ import annotations

import pytest

from raydock.config import hardware_profiles
from raydock.optimizers.parallel import Parallelism, check_profile, parallelism
from raydock.serve_apps.engine_app import parallel_args, serve_options

GiB = 2**30


def options(device_type: str, engine: str = "vllm") -> dict:
    config = {
        "scalingParameters": {
            "maxBatchSize": 8,
            "minReplicas": 1,
            "maxReplicas": 3,
            "scaleUpDelay": 30,
            "scaleDownDelay": 600,
        }
    }
    return serve_options(config, hardware_profiles()[device_type], engine)


@pytest.mark.parametrize("name", sorted(hardware_profiles()))
def test_every_profile_splits_exactly_its_gpus(name):
    check_profile(name, hardware_profiles()[name])


def test_a_bad_split_is_a_configuration_error():
    with pytest.raises(ValueError, match="tensor_parallel_size 2 x pipeline_parallel_size 1"):
        check_profile("x", {"num_gpus": 4, "tensor_parallel_size": 2})


@pytest.mark.parametrize(
    ("device_type", "split"),
    [
        ("g5.xlarge", Parallelism(1, 1)),
        ("g5.12xlarge", Parallelism(4, 1)),
        ("g4dn.12xlarge", Parallelism(4, 1)),
        ("g5.48xlarge", Parallelism(8, 1)),
        ("g4dn.metal", Parallelism(8, 1)),
        ("g5.12xlarge-x2", Parallelism(4, 2)),
        ("cpu-medium", Parallelism(1, 1)),
        ("cpu-medium-tp2", Parallelism(2, 1)),
    ],
)
def test_vllm_uses_every_device_of_the_type(device_type, split):
    assert parallelism("vllm", hardware_profiles()[device_type]) == split


def test_a_4_gpu_instance_is_one_placement_group_of_4_gpu_bundles():
    opts = options("g5.12xlarge")
    bundle = {"CPU": 12.0, "GPU": 1, "accelerator_type:A10G": 0.001, "memory": 48 * GiB}
    assert opts["placement_group_bundles"] == [bundle] * 4
    assert opts["placement_group_strategy"] == "STRICT_PACK"  # one host's GPUs
    # the replica actor sits in bundle 0 and leaves its GPU to vLLM's first worker
    assert opts["ray_actor_options"] == {"num_cpus": 12.0, "num_gpus": 0, "memory": 48 * GiB}
    # Serve scales by replicas, each with a group of its own: whole groups
    assert opts["autoscaling_config"]["max_replicas"] == 3
    assert parallel_args("vllm", hardware_profiles()["g5.12xlarge"]) == {
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 1,
        "distributed_executor_backend": "ray",
    }


def test_two_nodes_are_pipeline_stages_packed_over_hosts():
    opts = options("g5.12xlarge-x2")
    assert len(opts["placement_group_bundles"]) == 8
    assert opts["placement_group_strategy"] == "PACK"
    assert parallel_args("vllm", hardware_profiles()["g5.12xlarge-x2"]) == {
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "distributed_executor_backend": "ray",
    }


def test_one_device_keeps_plain_actor_options():
    opts = options("g5.xlarge")
    assert "placement_group_bundles" not in opts
    assert opts["ray_actor_options"] == {
        "num_cpus": 4,
        "num_gpus": 1,
        "accelerator_type": "A10G",
        "memory": 16 * GiB,
    }
    assert parallel_args("vllm", hardware_profiles()["g5.xlarge"]) == {}


def test_engines_without_model_splitting_take_the_whole_instance_as_before():
    opts = options("g5.12xlarge", engine="transformers")
    assert "placement_group_bundles" not in opts
    assert opts["ray_actor_options"]["num_gpus"] == 4
    assert parallel_args("ctranslate2", hardware_profiles()["g5.12xlarge"]) == {}


def test_cpu_tensor_parallel_uses_vllms_own_processes():
    opts = options("cpu-medium-tp2")
    assert opts["placement_group_bundles"] == [{"CPU": 1.0, "memory": 2 * GiB}] * 2
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0, "memory": 2 * GiB}
    assert parallel_args("vllm", hardware_profiles()["cpu-medium-tp2"]) == {
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "distributed_executor_backend": "mp",
    }
