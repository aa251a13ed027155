"""What a deploy body must pass before anything starts, in one place for the API (a 400 at
once) and the lifecycle (a deploy that waited for its model's import): the engine plan the
hardware can run, and the memory estimate the deviceType can hold."""

from __future__ import annotations

from typing import Any

from raydock.config import hardware_profiles
from raydock.errors import ApiError
from raydock.optimizers import fit, plan
from raydock.platform import catalog


def _figures(model: dict[str, Any]) -> tuple[dict | None, int | None, dict | None]:
    """(config figures, parameter count, declared quantization). A quantized checkpoint's
    count from its headers counts packed words (eight 4-bit weights in each int32 of an
    AWQ/GPTQ qweight), not weights: its config's shape counts them instead."""
    meta = model.get("metadata") or {}
    declared = meta.get("quantization_config")
    parameters = None if declared else meta.get("parameters")
    return meta.get("config_figures"), parameters, declared


def estimates(
    model: dict[str, Any], optimization: dict[str, Any], max_batch_size: int
) -> dict[str, fit.Estimate]:
    """The estimate on every deviceType whose hardware can run `optimization` (empty when
    the model's figures are unknown)."""
    figures, parameters, declared = _figures(model)
    if not figures:
        return {}
    plans, _ = _plans(optimization, declared)
    try:
        return fit.by_device(figures, plans, hardware_profiles(), max_batch_size, parameters)
    except ValueError:
        return {}


def _plans(
    optimization: dict[str, Any], declared: dict[str, Any] | None
) -> tuple[dict[str, plan.EnginePlan], ApiError | None]:
    """The engine plan of `optimization` on every deviceType whose hardware can run it, and
    the first refusal of one that cannot."""
    plans, refusal = {}, None
    for name, profile in hardware_profiles().items():
        try:
            plans[name] = plan.check(optimization, name, profile, declared)
        except ApiError as exc:
            refusal = refusal or exc
    return plans, refusal


def check_runs_somewhere(model: dict[str, Any], optimization: dict[str, Any]) -> None:
    """A 400 naming the field when no deviceType can run `optimization` for `model` (an
    engine not installed, a quantization the engine has not, one the model does not
    declare)."""
    plans, refusal = _plans(optimization, _figures(model)[2])
    if not plans and refusal is not None:
        raise refusal


def fit_report(
    model: dict[str, Any], optimization: dict[str, Any], max_batch_size: int
) -> dict[str, Any]:
    """Per deviceType whether the model fits, and the smallest that does (deploy forms and
    the catalog show it)."""
    found = estimates(model, optimization, max_batch_size)
    return {
        "suggestedDeviceType": fit.smallest_fit(found, hardware_profiles()),
        "deviceTypes": {name: e.to_dict() for name, e in found.items()},
    }


def check_deploy(model: dict[str, Any], config: dict[str, Any]) -> plan.EnginePlan:
    """The engine plan of a deploy body for `model`; ApiError (400, naming the field) when
    the hardware cannot run it or the deviceType cannot hold the model."""
    device_type = config["deviceType"]
    profile = hardware_profiles()[device_type]
    optimization = config.get("optimizationInfo") or {}
    figures, parameters, declared = _figures(model)
    catalog.check_optimization(model, optimization)
    engine = plan.check(optimization, device_type, profile, declared)
    batch = config["scalingParameters"]["maxBatchSize"]
    fit.check(
        figures,
        engine,
        device_type,
        profile,
        batch,
        parameters,
        suggest=lambda: fit.smallest_fit(
            estimates(model, optimization, batch), hardware_profiles()
        ),
    )
    return engine


def one_node_share(profile: dict[str, Any]) -> dict[str, float]:
    """The Ray resources one node must hold of a replica of `profile` (and of a conversion
    task for it): all of them, or one pipeline stage's share when its stages span nodes."""
    stages = int(profile.get("pipeline_parallel_size", 1))
    gpus = profile.get("num_gpus") or 0
    share = {"CPU": profile.get("num_cpus", 1) / stages}
    if gpus:
        share["GPU"] = gpus / stages
        if profile.get("accelerator_type"):  # Ray's label of a GPU model, on the GPUs' node
            share[f"accelerator_type:{profile['accelerator_type']}"] = 0.001
    if profile.get("memory_gb"):
        share["memory"] = profile["memory_gb"] * 2**30 / stages
    return share


_UNITS = {"CPU": ("CPUs", 1), "GPU": ("GPUs", 1), "memory": ("GiB memory", 2**30)}


def _amount(resource: str, value: float) -> str:
    if resource.startswith("accelerator_type:"):
        model = resource.removeprefix("accelerator_type:")
        return f"{model} GPUs" if value else f"no {model} GPUs"
    unit, scale = _UNITS[resource]
    return f"{value / scale:g} {unit}"


def _placement_problem(profile: dict[str, Any], nodes: list[dict[str, float]]) -> str | None:
    """Why no node (or, for pipeline stages, not enough nodes) can hold a replica: Ray
    places an actor or task on one node, and waits without end for one that fits."""
    share = one_node_share(profile)
    stages = int(profile.get("pipeline_parallel_size", 1))
    held = sum(
        min(int(node.get(r, 0) // need) for r, need in share.items() if need) for node in nodes
    )
    if held >= stages:
        return None
    where = "on one node" if stages == 1 else f"on each of {stages} nodes"
    largest = {r: max((n.get(r, 0) for n in nodes), default=0) for r in share}
    short = [r for r, need in share.items() if largest[r] < need]
    if short:
        needs = ", ".join(_amount(r, share[r]) for r in short)
        has = ", ".join(_amount(r, largest[r]) for r in short)
        return f"needs {needs} {where}; the largest node has {has}"
    together = ", ".join(_amount(r, v) for r, v in share.items() if v)
    if held:
        return f"needs {together} {where}; the cluster's nodes hold {held} such share(s)"
    return f"needs {together} together {where}; no node of the cluster has them all"


def device_problem(profile: dict[str, Any], autoscaling: bool) -> str | None:
    """Why this cluster cannot place one replica of `profile` now, or None (always None when
    the cluster autoscales: the nodes may come)."""
    if autoscaling:
        return None
    import ray

    have = ray.cluster_resources()
    gpus = profile.get("num_gpus", 0)
    acc = profile.get("accelerator_type")
    if gpus and have.get("GPU", 0) < gpus:
        return f"needs {gpus} GPU(s) ({acc}); the cluster has {int(have.get('GPU', 0))}"
    if gpus and acc and f"accelerator_type:{acc}" not in have:
        return f"needs {acc} GPUs; the cluster has none"
    return _placement_problem(profile, [n["Resources"] for n in ray.nodes() if n.get("Alive")])


def check_cluster(device_type: str, autoscaling: bool) -> None:
    """400 when the cluster cannot run a replica of `device_type`."""
    problem = device_problem(hardware_profiles()[device_type], autoscaling)
    if problem:
        cpu = [n for n, p in hardware_profiles().items() if not p.get("num_gpus")]
        raise ApiError(
            400,
            f"deviceType {device_type!r} {problem}; choose one of {cpu} or add such nodes",
            "deviceType",
            "device_unavailable",
        )
