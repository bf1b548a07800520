"""A served model's weights state machine: stage, swap, rollback, free, versions.

Weight state follows the runner's two buffers: ``active`` serves now; ``staged`` is written
to the inactive buffer, not swapped in yet; ``previous`` is in the inactive buffer after a
swap (what rollback restores). Runs take the model's reader/writer lock shared; flips (swap,
rollback, direct active updates, blob loads) take it exclusive, so every replica changes
between two requests and each response reports the version that computed it.

Runner hazards guarded here (torch 2.13's model container; docs/server.md lists them):
swap needs a staged version (swapping to an empty buffer leaves the model unable to run);
free releases the runner's memory only for a buffer that never served (freeing one that
did, then staging into it, segfaults), else it forgets the version and keeps the memory;
extract(inactive) needs a staged or previous version (a freed buffer is freed memory), and
nothing reads the inactive buffer while ``inactive_empty`` (a CUDA runner crashes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from aotiserve import runner_ext

from . import buffer_writes as bw
from .buffer_contents import BufferContents
from .errors import Aborted, FailedPrecondition, Internal, Unavailable
from .metrics import Metrics
from .model_types import ConstantInfo, ModelState, WeightsVersion
from .rwlock import RWLock
from .weights_store import WeightsStore

log = logging.getLogger(__name__)


class _Model(Protocol):
    """What the state machine uses of its ``served_model.ServedModel``."""

    name: str
    state: ModelState
    replicas: list[Any]
    constants: dict[str, ConstantInfo]
    metrics: Metrics | None
    rw: RWLock
    port: Any
    weights_op: threading.Lock
    folds_at_run_time: bool


class ModelWeights:
    """The versions a model's buffers hold, and every operation that changes them."""

    def __init__(self, model: _Model, active: WeightsVersion):
        self._model = model
        self.active = active
        self.staged: WeightsVersion | None = None
        self.previous: WeightsVersion | None = None
        self.swaps = 0  # parity tells which of the container's buffers is inactive
        # The inactive buffer holds no memory of its own: none yet (a model loads with one
        # buffer), or the runner freed it. Its extracted views would point at nothing valid
        # (a CUDA runner crashes reading them), so nothing extracts it then.
        self.inactive_empty = True
        # An upload is writing into the inactive buffer (one at a time per model).
        self.uploading = False
        # What each buffer holds per constant (partial stagings copy only what differs).
        self.contents = BufferContents(model.constants)

    @property
    def inactive_has_served(self) -> bool:
        """Whether the inactive buffer was ever active (the primary always was)."""
        return self.swaps > 0

    def snapshot(self) -> tuple:
        """Which weights the buffers hold now (compare with :meth:`check`)."""
        return (self.active, self.staged, self.previous)

    def check(self, snapshot: tuple) -> None:
        """Refuses to go on reading buffers whose weights changed since ``snapshot``."""
        if self.snapshot() != snapshot:
            raise Aborted(f"model {self._model.name!r}: its weights changed during the read; retry")

    # Staging -----------------------------------------------------------------

    def stage(
        self,
        tensors: Mapping[str, Sequence[torch.Tensor]],
        use_inactive: bool,
        version: WeightsVersion,
        store: WeightsStore | None,
    ) -> None:
        """Writes per-replica tensors ({fqn: [tensor per replica]}) into a buffer.

        ``use_inactive``: the inactive buffer, completed with the active weights
        for constants not sent; otherwise the active buffer, in place, with no
        run in flight.
        """
        model = self._model
        with self._op():
            if use_inactive:
                stale = self.contents.stale(set(model.constants) - set(tensors))
                for i, replica in enumerate(model.replicas):
                    bw.write_inactive(
                        replica,
                        model.constants,
                        {fqn: ts[i] for fqn, ts in tensors.items()},
                        stale,
                        self.inactive_empty,
                    )
                self.inactive_empty = False
                self.contents.synced(stale)
                self.contents.written_inactive(tensors)
                if store is not None:
                    store.save_version(model.name, version, self._extract(0, True))
                self.staged, self.previous = version, None
                return
            if store is not None:
                active = self._extract(0, False)
                merged = {
                    fqn: (tensors[fqn][0] if fqn in tensors else active[fqn])
                    for fqn in model.constants
                }
                store.save_version(model.name, version, merged)
            with self._serving_change():
                for i, replica in enumerate(model.replicas):
                    bw.write_active(
                        replica, model.constants, {fqn: ts[i] for fqn, ts in tensors.items()}
                    )
                self.active = version
                self.contents.written_active(tensors)
            if store is not None:
                store.commit(model.name, version)
                self._prune(store)
            self.gauge_version()

    def begin_upload(self, fqns: Sequence[str]) -> list[dict[str, torch.Tensor]] | None:
        """Claims the inactive buffer for an upload; returns per-replica views to write into.

        Writing in place keeps a staging at (active + new) memory: no extra copy of the
        new weights. The buffer is first filled with the active weights when it holds
        none (so a partial update starts from what serves). The staged and previous
        versions it held are dropped: rollback is no longer possible once an upload
        starts. Returns None where in-place writing is impossible (then the upload
        allocates its own tensors). Always pair with :meth:`end_upload`.
        """
        model = self._model
        with self._op():
            if self.uploading:
                raise FailedPrecondition(
                    f"model {model.name!r}: another weights upload is in progress"
                )
            self.uploading = True
            try:
                self.staged = self.previous = None
                views = []
                every = set(fqns) >= set(model.constants)
                filled = False
                for replica in model.replicas:
                    current = bw.inactive_views(replica, self.inactive_empty)
                    fits = bw.views_fit(model.constants, current)
                    if not fits and every:
                        # Nothing to write into, and every constant comes: the upload
                        # makes its own tensors (no fill with weights it overwrites),
                        # which become the buffer once staged.
                        self.contents.forget_inactive()
                        return None
                    if not fits:
                        current = bw.fill_inactive(replica, model.constants)
                        filled = True
                    views.append({fqn: current[fqn] for fqn in fqns})
                if filled:
                    self.contents.synced(model.constants)
                # Overwritten from here on (a failed upload leaves them half written).
                self.contents.forget_inactive(fqns)
                self.inactive_empty = False
                if not all(bw.views_fit(model.constants, v, fqns) for v in views):
                    return None
                return views
            except BaseException:
                self.uploading = False
                raise

    def end_upload(self) -> None:
        with self._model.weights_op:
            self.uploading = False

    def reserve_inactive(self) -> None:
        """Gives every replica an inactive buffer now, holding a copy of the active weights
        (no version: nothing to swap to, rollback still refused). The first upload then
        writes in place into memory the daemon already holds instead of faulting in fresh
        pages (docs/benchmarks-server.md), and a model whose two buffers do not fit fails
        now rather than at its first upload."""
        model = self._model
        with self._op():
            filled = False
            for replica in model.replicas:
                views = bw.inactive_views(replica, self.inactive_empty)
                if not bw.views_fit(model.constants, views):
                    bw.fill_inactive(replica, model.constants)
                    filled = True
            if filled:
                self.contents.synced(model.constants)
            self.inactive_empty = False
        log.info(
            "model %r: inactive buffer reserved (%.1f MiB per replica)",
            model.name,
            sum(i.nbytes for i in model.constants.values()) / 2**20,
        )

    def restore(self, version: WeightsVersion, tensors: Mapping[str, torch.Tensor]) -> None:
        """Serves a persisted version (at load, before the model is READY)."""
        model = self._model
        per_replica = {}
        for fqn, info in model.constants.items():
            if fqn not in tensors:
                raise Internal(f"stored version {version.id} of {model.name!r} lacks {fqn!r}")
            t = tensors[fqn]
            if t.dtype != info.dtype or tuple(t.shape) != info.shape:
                raise Internal(
                    f"stored version {version.id} of {model.name!r}: {fqn!r} does "
                    "not match the package"
                )
            per_replica[fqn] = [r.pool.to_device(t) for r in model.replicas]
        self.stage(per_replica, True, version, None)
        self.swap(None)
        self.previous = None

    # Reading -----------------------------------------------------------------

    def extract(self, use_inactive: bool) -> tuple[dict[str, torch.Tensor], WeightsVersion]:
        with self._op():
            if use_inactive:
                version = self.staged or self.previous
                if version is None:
                    raise FailedPrecondition(
                        f"model {self._model.name!r}: the inactive buffer holds no weights "
                        "(nothing staged, or it was freed)"
                    )
            else:
                version = self.active
            return self._extract(0, use_inactive), version

    def _extract(self, replica_index: int, use_inactive: bool) -> dict[str, torch.Tensor]:
        model = self._model
        m = model.replicas[replica_index].runner.extract_constants_map(use_inactive)
        return {fqn: t for fqn, t in m.items() if fqn in model.constants}

    # Flips -------------------------------------------------------------------

    def swap(self, store: WeightsStore | None) -> WeightsVersion:
        name = self._model.name
        with self._op():
            if self.staged is None:
                hint = (
                    " (previous weights are held: use RollbackConstantBuffer to restore them)"
                    if self.previous
                    else ""
                )
                raise FailedPrecondition(
                    f"model {name!r}: nothing is staged in the inactive buffer; "
                    f"stage weights with UpdateConstantBuffer(use_inactive=true) first{hint}"
                )

            def commit() -> None:
                self.previous, self.active, self.staged = self.active, self.staged, None

            # Warmed before the flip: the staged buffer's folded constants are computed
            # now, while runs go on, not by the first run after the flip with every other
            # run held back.
            if self._model.folds_at_run_time:
                for replica in self._model.replicas:
                    bw.fold_inactive(replica, self._model.constants)

            self._flip(commit, self.staged.id)
            if store is not None:
                store.commit(name, self.active)
            self.gauge_version()
            return self.active

    def rollback(self, store: WeightsStore | None) -> WeightsVersion:
        name = self._model.name
        with self._op():
            if self.previous is None:
                raise FailedPrecondition(
                    f"model {name!r}: no previous weights to roll back to "
                    "(nothing was swapped in, or the inactive buffer was freed or restaged)"
                )

            def back() -> None:
                self.previous, self.active = self.active, self.previous

            self._flip(back, self.previous.id)
            if store is not None:
                store.commit(name, self.active)
            self.gauge_version()
            return self.active

    def _flip(self, versions: Callable[[], None], active_after: str) -> None:
        """Swaps every replica's buffers and, in the same instant, ``versions()`` moves
        the version bookkeeping (so a Run's trailer names the weights that served it:
        ``active_after``). On the port's hot path the flip and its version are one step
        in C++, so its runs wait for the flip alone."""
        model = self._model
        with model.rw.exclusive():
            if model.port is not None:
                model.port.flip(model, active_after)
            else:
                for replica in model.replicas:
                    replica.runner.swap_constant_buffer()
            self.swaps += 1
            self.contents.flip()
            versions()

    def free_inactive(self, store: WeightsStore | None) -> None:
        model = self._model
        with self._op():
            if self.staged is None and self.previous is None:
                return
            # The runner frees a buffer only where that is safe (it never held constants
            # folded at run time: never served).
            if not self.inactive_has_served and all(
                [replica.runner.free_inactive_constant_buffer() for replica in model.replicas]
            ):
                self.inactive_empty = True
                self.contents.forget_inactive()
            else:
                log.debug(
                    "model %r: the inactive buffer has served; keeping its memory "
                    "(freeing it makes the container crash on the next staging)",
                    model.name,
                )
            self.staged = self.previous = None
            runner_ext.empty_cpu_block_cache()  # freed means given back, not kept for reuse
            if store is not None:
                self._prune(store)

    def update_from_blob(
        self, path: str, version: WeightsVersion, store: WeightsStore | None = None
    ) -> WeightsVersion:
        """Loads a weights blob into the active buffer of every replica (no run in flight)."""
        model = self._model
        with self._op():
            with self._serving_change():
                for replica in model.replicas:
                    replica.runner.update_constant_buffer_from_blob(path)
                self.active = version
                self.contents.written_active(model.constants)
            if store is not None:
                store.save_version(model.name, version, self._extract(0, False))
                store.commit(model.name, version)
                self._prune(store)
            self.gauge_version()
            return version

    # Bookkeeping ---------------------------------------------------------------

    def _prune(self, store: WeightsStore) -> None:
        store.prune(
            self._model.name, {v.id for v in (self.active, self.staged, self.previous) if v}
        )

    def gauge_version(self) -> None:
        metrics = self._model.metrics
        if metrics:
            metrics.set_active_version(
                self._model.name, self.active.id, self.active.digest, self.active.created_unix_ms
            )

    @contextmanager
    def _serving_change(self) -> Iterator[None]:
        """No run in flight, on any port, while the serving weights change."""
        model = self._model
        with model.rw.exclusive():
            if model.port is None:
                yield
            else:
                with model.port.weights_change(model):
                    yield

    @contextmanager
    def _op(self) -> Iterator[None]:
        """One weight operation at a time, and none once the model is unloading."""
        model = self._model
        with model.weights_op:
            if model.state not in (ModelState.READY, ModelState.LOADING) or not model.replicas:
                raise Unavailable(f"model {model.name!r} is {model.state.name.lower()}")
            yield
