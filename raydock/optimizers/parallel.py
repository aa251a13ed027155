"""How one engine replica spreads over the devices of its deviceType (configs/hardware.yaml).

vLLM splits a model over `tensor_parallel_size` x `pipeline_parallel_size` devices of a
deviceType (`tensor_parallel_size` defaults to all of an instance's GPUs, pipeline stages to
1: a model that needs more than one node gets a deviceType with `pipeline_parallel_size` > 1
and `num_gpus` counting every node's GPUs). The replica's resources are then reserved as one
Ray placement group, one bundle per device, so that vLLM's workers (Ray actors in the
replica's group) land on the GPUs reserved for them and Serve scales by whole groups.
The other engines use one device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parallelism:
    tensor: int = 1
    pipeline: int = 1

    @property
    def devices(self) -> int:
        return self.tensor * self.pipeline


def parallelism(engine: str, profile: dict[str, Any]) -> Parallelism:
    """The engine's split over the profile's devices; 1 x 1 for engines that use one."""
    if engine != "vllm":
        return Parallelism()
    gpus = int(profile.get("num_gpus") or 0)
    pipeline = int(profile.get("pipeline_parallel_size", 1))
    tensor = int(profile.get("tensor_parallel_size", max(1, gpus // pipeline)))
    return Parallelism(tensor, pipeline)


def check_profile(name: str, profile: dict[str, Any]) -> None:
    """A hardware profile whose split does not match its GPUs is a configuration error."""
    p = parallelism("vllm", profile)
    gpus = int(profile.get("num_gpus") or 0)
    if p.tensor < 1 or p.pipeline < 1:
        raise ValueError(f"hardware profile {name!r}: parallel sizes must be at least 1")
    if gpus and p.devices != gpus:
        raise ValueError(
            f"hardware profile {name!r}: tensor_parallel_size {p.tensor} x "
            f"pipeline_parallel_size {p.pipeline} must equal num_gpus {gpus}"
        )


def actor_and_placement(
    profile: dict[str, Any], p: Parallelism
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The replica actor's Ray options and, for a replica over several devices, Serve's
    `placement_group_bundles` / `placement_group_strategy`.

    One bundle per device with an equal share of the profile's CPUs and memory; the replica
    actor takes bundle 0's CPUs and memory and leaves its GPU to vLLM's first worker (each
    worker asks for one GPU). One node's devices are STRICT_PACKed (tensor parallelism wants
    the GPUs of one host); pipeline stages over several nodes are PACKed (each node's
    bundles together where they fit).
    """
    cpus = profile.get("num_cpus", 1)
    memory = int(profile["memory_gb"] * 2**30) if profile.get("memory_gb") else None
    gpus = profile.get("num_gpus") or 0
    if p.devices == 1:
        actor: dict[str, Any] = {"num_cpus": cpus}
        if gpus:
            actor["num_gpus"] = gpus
            if profile.get("accelerator_type"):
                actor["accelerator_type"] = profile["accelerator_type"]
        if memory:
            actor["memory"] = memory
        return actor, {}
    bundle: dict[str, Any] = {"CPU": cpus / p.devices}
    if gpus:
        bundle["GPU"] = 1
        if profile.get("accelerator_type"):
            # Ray's label for a GPU model (what `accelerator_type=` asks for, as a resource)
            bundle[f"accelerator_type:{profile['accelerator_type']}"] = 0.001
    if memory:
        bundle["memory"] = memory // p.devices
    actor = {"num_cpus": bundle["CPU"], "num_gpus": 0}
    if memory:
        actor["memory"] = bundle["memory"]
    return actor, {
        "placement_group_bundles": [dict(bundle) for _ in range(p.devices)],
        "placement_group_strategy": "STRICT_PACK" if p.pipeline == 1 else "PACK",
    }


def engine_args(p: Parallelism, device: str) -> dict[str, Any]:
    """vLLM's engine arguments for the split: on GPUs its Ray executor, which places the
    workers in the replica's placement group; on CPUs its own processes."""
    if p.devices == 1:
        return {}
    return {
        "tensor_parallel_size": p.tensor,
        "pipeline_parallel_size": p.pipeline,
        "distributed_executor_backend": "mp" if device == "cpu" else "ray",
    }
