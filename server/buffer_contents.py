"""What each of a model's two constant buffers holds, per constant, so a partial staging
copies only what it changes.

Each constant of each buffer carries a token standing for its content: a new token
whenever new bytes are written, the other buffer's token when it is copied from there.
A staging of k of n constants then copies into the inactive buffer only the unsent
constants whose token differs from the active buffer's (and keeps the others where they
are): after the first fill, an update of k constants costs k writes plus the constants
the previous update changed (the inactive buffer still holds their older content), not n.

Tokens are model-wide (every replica goes through the same operations). An unknown
token (missing) means the buffer's content is not known: nothing there yet, freed, or
being overwritten by an upload in progress.
"""

from __future__ import annotations

from collections.abc import Iterable


class BufferContents:
    def __init__(self, fqns: Iterable[str]):
        self.active: dict[str, object] = {fqn: object() for fqn in fqns}
        self.inactive: dict[str, object] = {}

    def stale(self, fqns: Iterable[str]) -> set[str]:
        """The constants of ``fqns`` whose inactive content differs from the active one."""
        return {f for f in fqns if self.inactive.get(f) is not self.active[f]}

    def synced(self, fqns: Iterable[str]) -> None:
        """``fqns`` were copied from the active buffer into the inactive one."""
        for f in fqns:
            self.inactive[f] = self.active[f]

    def written_inactive(self, fqns: Iterable[str]) -> None:
        for f in fqns:
            self.inactive[f] = object()

    def written_active(self, fqns: Iterable[str]) -> None:
        for f in fqns:
            self.active[f] = object()

    def forget_inactive(self, fqns: Iterable[str] | None = None) -> None:
        """The inactive content of ``fqns`` (default: all) is no longer known."""
        if fqns is None:
            self.inactive = {}
        else:
            for f in fqns:
                self.inactive.pop(f, None)

    def flip(self) -> None:
        self.active, self.inactive = self.inactive, self.active
