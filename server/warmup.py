"""Model warm-up: runs on representative inputs before a model turns READY.

The first run of a model pays for lazy initialisation — on CUDA each kernel
module loads at its first launch, allocators grow, and CPU thread pools start —
so without warm-up the first real requests are the slow ones. Warm-up runs on threads
that end when it is done, so the library handles they created (cuDNN, cuBLAS: one per
thread, milliseconds to create) are left in torch's pools for the serving threads. Each replica runs
``runs`` rounds; a round makes one call per model instance of the container, at
once, so that the instances a container picks for concurrent requests are warm
too. Inputs are zeros shaped from the input specs, at the smallest size of each dynamic
dim, and on a GPU at a small batch too (io_specs.warm_up_inputs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from . import io_specs

log = logging.getLogger(__name__)


def input_sets(inputs: Sequence[Any], replicas: Sequence[Any]) -> list[list[torch.Tensor]]:
    """The warm-up inputs for a model on ``replicas``: a GPU among them adds a small batch
    (io_specs.warm_up_inputs); [] where the input specs are incomplete."""
    on_gpu = any(r.pool.device.type == "cuda" for r in replicas)
    return io_specs.warm_up_inputs(inputs, on_gpu)


def warm_up(
    name: str, replicas: Sequence[Any], inputs: Sequence[io_specs.IOSpec], runs: int, runners: int
) -> int:
    """Runs every replica ``runs`` rounds of ``runners`` concurrent calls; returns the
    number of runs made (0 where warm-up is off or impossible). A failing run ends the
    warm-up with a warning: the model still serves (its own guards judge requests)."""
    if runs < 1 or not replicas:
        return 0
    sets = input_sets(inputs, replicas)
    if not sets:
        log.info("model %r: no warm-up (its input dtypes/shapes are unknown)", name)
        return 0
    started = time.monotonic()
    done = 0
    try:
        for replica in replicas:
            for tensors in sets:
                done += _warm_replica(replica, tensors, runs, runners)
    except Exception as exc:  # noqa: BLE001 (a model that refuses zeros is still served)
        log.warning(
            "model %r: warm-up run failed after %d run(s): %s", name, done, str(exc).split("\n")[0]
        )
        return done
    log.info(
        "model %r: warmed up with %d run(s) on %d replica(s) in %.1f ms",
        name,
        done,
        len(replicas),
        (time.monotonic() - started) * 1e3,
    )
    return done


def _warm_replica(replica: Any, tensors: list[torch.Tensor], runs: int, runners: int) -> int:
    def once(_: int) -> None:
        replica.pool.execute(replica.runner, tensors)

    # Threads of their own, which end here: per-thread library handles (cuDNN, cuBLAS) that
    # a run creates go back to torch's pools when their thread ends, and the serving
    # threads' first runs take them from there instead of creating their own.
    width = max(1, runners)
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="aotiserve-warmup") as pool:
        for _ in range(runs):
            list(pool.map(once, range(width)))
    return runs * width
