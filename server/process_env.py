"""Huge pages for large tensors: the environment the daemon's allocators start with.

Each copy of a 64 MiB tensor into fresh memory faults in 16,384 pages of 4 KiB; on
this kind of machine that costs more than the copy (about 35 ms against 6 ms). With
transparent huge pages it is 32 faults. Two allocators matter: glibc's malloc (the
``bytes`` grpcio hands Python, the messages protobuf builds) takes huge pages with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, and torch's CPU allocator (tensors the
models write, the native data port's request buffers) with ``THP_MEM_ALLOC_ENABLE=1``.
Both are read once, when the process starts, so ``aotiserve serve`` executes itself
again (same pid) with them set, before anything large is allocated. Off with
``huge_pages = false`` (``--no-huge-pages``), or where the kernel has THP off.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
GLIBC_HUGETLB = "glibc.malloc.hugetlb"


def thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The kernel's THP mode ("always", "madvise", "never"); None where unknown."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_env(env: Mapping[str, str], mode: str | None) -> dict[str, str]:
    """The variables to add to ``env`` for huge pages (empty: nothing to change). A
    setting the user made (either variable naming it) is left as it is."""
    if mode not in ("always", "madvise"):
        return {}
    updates = {}
    tunables = env.get("GLIBC_TUNABLES", "")
    if GLIBC_HUGETLB not in tunables:
        updates["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{GLIBC_HUGETLB}=1") if t)
    if "THP_MEM_ALLOC_ENABLE" not in env:
        updates["THP_MEM_ALLOC_ENABLE"] = "1"
    return updates


def restart_with_huge_pages(env: Mapping[str, str], argv: Sequence[str]) -> None:
    """Executes ``python -m aotiserve.server argv`` in place of this process with the
    huge-page settings added, when any is missing; returns only when nothing was
    missing or the exec failed (then the daemon runs on without them)."""
    updates = huge_page_env(env, thp_mode())
    if not updates or not sys.executable:
        return
    log.debug("restarting with %s", updates)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "aotiserve.server", *argv],
                  {**env, **updates})
    except OSError as exc:
        log.warning("huge pages for large tensors: could not restart with %s (%s); "
                    "running without them", updates, exc)
