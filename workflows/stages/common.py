"""Small helpers the stages share: Ray start-up, running a function as a Ray task, the learned perceiver."""

from __future__ import annotations

from typing import Any

from workflows.context import RunContext, StageResult


def ray_ready(ctx: RunContext) -> None:
    """Join the cluster of ``--ray-address`` or start a local Ray (dashboard on 127.0.0.1), once per process."""
    from synth.distribute import ensure_ray

    ensure_ray(ctx.ray_address, worker_output=ctx.worker_output)


def remote_call(fn, *args: Any, num_cpus: float = 1, num_gpus: float = 0, **kwargs: Any) -> Any:
    """Run ``fn`` as one Ray task (on whatever node has the resources) and return its value."""
    import ray

    return ray.get(ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(fn).remote(*args, **kwargs))


def learned_perceiver(inputs: dict[str, StageResult]) -> dict[str, Any]:
    """The perceiver the previous stage learned: its config and its prompts file."""
    p = inputs["perceiver"].outputs
    return {"config": p["perceiver_config"], "prompts": p["prompts"]}


def resolved_priors(spec: dict[str, Any], inputs: dict[str, StageResult]) -> dict[str, Any]:
    """ClearAIR's default assessor is the learned perceiver: fill in its config and prompts unless given."""
    spec = dict(spec)
    assessor = dict(spec.get("assessor") or {})
    if spec.get("kind") == "clearair" and assessor.get("kind") == "perceiver" and "config" not in assessor:
        spec["assessor"] = {**assessor, **learned_perceiver(inputs)}
    return spec
