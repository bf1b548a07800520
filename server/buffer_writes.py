"""Writing constants into a replica's runner buffers, in the buffers' own memory.

A runner holds two constant buffers (active, inactive). These helpers read them
as {fqn: tensor} views and write into them in place, so a staging costs the new
weights' bytes and no second copy. ``constants`` is a model's updatable constants
by original FQN (``model_types.ConstantInfo``); ``replica`` is a
``served_model.Replica`` (its runner and its device pool's stream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .model_types import ConstantInfo


def views_fit(
    constants: Mapping[str, ConstantInfo],
    views: Mapping[str, torch.Tensor],
    fqns: Sequence[str] | None = None,
) -> bool:
    """Whether ``views`` hold a contiguous tensor of the right dtype and shape for each
    of ``fqns`` (default: every constant)."""
    for fqn in fqns if fqns is not None else constants:
        info = constants[fqn]
        t = views.get(fqn)
        if (
            t is None
            or t.dtype != info.dtype
            or tuple(t.shape) != info.shape
            or not t.is_contiguous()
        ):
            return False
    return True


def copy_into(
    replica: Any,
    constants: Mapping[str, ConstantInfo],
    fqn: str,
    dst: torch.Tensor | None,
    src: torch.Tensor,
) -> torch.Tensor | None:
    """Copies ``src`` into ``dst`` (a buffer's own memory for constant ``fqn``) and
    returns ``dst``; None where there is no such memory to write into."""
    if dst is None or not views_fit(constants, {fqn: dst}, [fqn]):
        return None
    replica.pool.run_in_stream(lambda: dst.copy_(src))
    return dst


def inactive_map(
    replica: Any,
    constants: Mapping[str, ConstantInfo],
    new: Mapping[str, torch.Tensor],
    stale: set[str],
    inactive_empty: bool,
) -> dict[str, torch.Tensor]:
    """The inactive buffer's next content, by constant name: ``new`` ({fqn: tensor},
    tensors nothing else uses), and for every other constant the active weights (a
    partial update starts from what serves): kept where the inactive buffer already
    holds them, copied into its own memory where it does not (``stale``, see
    buffer_contents). No tensor of the result shares memory with the active buffer."""
    missing = [fqn for fqn in constants if fqn not in new]
    current = inactive_views(replica, inactive_empty) if missing else {}
    active = replica.runner.extract_constants_map(False) if missing else {}
    full = {}
    for fqn, info in constants.items():
        t = new.get(fqn)
        if t is None and fqn not in stale and views_fit(constants, current, [fqn]):
            t = current[fqn]  # holds the active content already: nothing to copy
        elif t is None:
            t = copy_into(replica, constants, fqn, current.get(fqn), active[fqn])
            if t is None:
                t = active[fqn].clone()
        full[info.name] = t
    return full


def write_active(
    replica: Any, constants: Mapping[str, ConstantInfo], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Writes ``tensors`` ({fqn: tensor}) into the serving buffer's own memory (no run
    may be in flight), then hands them over as they are: no second buffer is allocated."""
    live = replica.runner.extract_constants_map(False)
    m = {}
    for fqn, t in tensors.items():
        dst = copy_into(replica, constants, fqn, live.get(fqn), t)
        m[constants[fqn].name] = t if dst is None else dst
    replica.pool.run_in_stream(
        lambda: replica.runner.update_constant_buffer(m, False, False, user_managed=True)
    )


def write_inactive(
    replica: Any,
    constants: Mapping[str, ConstantInfo],
    tensors: Mapping[str, torch.Tensor],
    stale: set[str],
    inactive_empty: bool,
) -> None:
    """Stages ``tensors`` ({fqn: tensor}) in the inactive buffer, completed with the
    active weights for constants not given (copied where ``stale``). Handed over, not
    copied: the tensors are the inactive buffer's own memory (written in place) or ones
    made for this upload alone. A copy here doubled the time of a staging and, for a
    buffer torch had filled from the package, allocated a second one for good."""
    full = inactive_map(replica, constants, tensors, stale, inactive_empty)
    replica.pool.run_in_stream(
        lambda: replica.runner.update_constant_buffer(full, True, False, user_managed=True)
    )


def fold_inactive(replica: Any, constants: Mapping[str, ConstantInfo]) -> None:
    """Computes the constants the package folds at run time for the inactive buffer now,
    so the first run after a swap does not fold them while every other run waits.

    torch's container (2.13) folds from the staged weights, then puts back every lifted
    tensor constant of the inactive buffer as a clone of the *active* one's: those are
    written back here, in place (a new update would mark the buffer unfolded again)."""

    def fold() -> None:
        device = replica.pool.device
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
        staged = replica.runner.extract_constants_map(True)
        replica.runner.run_const_fold(True, stream)
        after = replica.runner.extract_constants_map(True)
        for fqn in constants:
            want, now = staged.get(fqn), after.get(fqn)
            if want is not None and now is not None and now.data_ptr() != want.data_ptr():
                now.copy_(want)

    replica.pool.run_in_stream(fold)


def inactive_views(replica: Any, empty: bool) -> dict[str, torch.Tensor]:
    """The replica's inactive buffer by FQN; empty while it has no memory (``empty``:
    never read then, a CUDA runner crashes reading it)."""
    if empty:
        return {}
    return replica.runner.extract_constants_map(True)


def fill_inactive(replica: Any, constants: Mapping[str, ConstantInfo]) -> dict[str, torch.Tensor]:
    """Copies the active weights into the replica's inactive buffer (the runner allocates
    it where it has none); returns the buffer's views by FQN."""
    active = replica.runner.extract_constants_map(False)
    full = {info.name: active[fqn] for fqn, info in constants.items()}
    replica.pool.run_in_stream(lambda: replica.runner.update_constant_buffer(full, True, False))
    return replica.runner.extract_constants_map(True)
