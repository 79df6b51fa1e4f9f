"""A stage split as platform tiers: one tier per stage, each with its own replica count.

The head tier (layers 0:a) serves the OpenAI API and owns the scheduler, so it runs one
replica per pipeline; every later stage is a tier of `strata stage --layers a:b --join
<head>` processes, which register with the head themselves when they start and leave
it when drained, so the platform scales a stage tier exactly as it scales engines and the
autoscaler needs only the stage's own signals (`strata.stages.scaling`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from strata.platform.process import ProcessSpec
from strata.stages.plan import StageSpec


def stage_tier_name(layers: str) -> str:
    """'15:30' -> 'stage-15-30' (a valid tier name)."""
    return "stage-" + layers.replace(":", "-")


def stage_process_specs(
    stages: Sequence[StageSpec],
    *,
    head_url: Callable[[], str],
    model: str | None = None,
    threads: int = 1,
    dtype: str = "auto",
    head_args: Sequence[str] = (),
) -> dict[str, ProcessSpec]:
    """How to launch each stage tier's replicas; `head_url` is read at each launch.

    Start the head tier first: a stage replica launched before the head has an address
    still joins it, since `--join` retries until the head answers.
    """
    if len(stages) < 2:
        raise ValueError("a stage pipeline needs at least two stages")
    split = ",".join(s.layers for s in stages)
    base = [sys.executable, "-m", "strata.cli", "stage", "--threads", str(threads),
            "--dtype", dtype, "--log-level", "warning"]
    if model is not None:
        base += ["--model", model]

    def head_argv(host: str, port: int) -> list[str]:
        return [*base, "--layers", stages[0].layers, "--stages", split, "--host", host,
                "--port", str(port), *head_args]

    def stage_argv(layers: str) -> Callable[[str, int], list[str]]:
        def argv(host: str, port: int) -> list[str]:
            return [*base, "--layers", layers, "--host", host, "--port", str(port),
                    "--data-port", "0", "--join", head_url()]

        return argv

    specs = {stage_tier_name(stages[0].layers): ProcessSpec(argv=head_argv, threads=threads)}
    for s in stages[1:]:
        specs[stage_tier_name(s.layers)] = ProcessSpec(argv=stage_argv(s.layers), threads=threads)
    return specs
