"""How fast the host side of a file pull can go: ways of reading a file in the page cache
into (pinned) host buffers on many threads, each 1 MiB piece hashed (XXH3-128) right after
it is read, as ``server/weights_pull.py`` does. One run, side by side:

- ``window``: per task, a mapping of the task's bytes (MAP_POPULATE), copied out, unmapped
  (``runner_ext.FileWindow``, what the pull uses);
- ``mapped``: one mapping of the whole file, shared by every thread, copied out of;
- ``pread``: ``os.preadv`` into the buffer (no mapping);
- ``memcpy``: the same copies from an anonymous buffer (the ceiling: no page cache).

    python -m bench.file_read [--gib 4] [--threads N] [--task-mib 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xxhash

from aotiserve import runner_ext

PIECE = 1 << 20


def _buffers(threads: int, nbytes: int) -> list[np.ndarray]:
    pin = torch.cuda.is_available()
    return [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).numpy() for _ in range(threads)]


def _hash_pieces(dst: memoryview, fill) -> None:
    for p in range(0, len(dst), PIECE):
        piece = dst[p : p + PIECE]
        fill(p, piece)
        xxhash.xxh3_128(piece).digest()


def run(method: str, fd: int, size: int, threads: int, task: int, whole) -> float:
    buffers = _buffers(threads, task)
    free = list(range(threads))
    source = np.empty(task, dtype=np.uint8) if method == "memcpy" else None

    def one(offset: int) -> None:
        slot = free.pop()
        try:
            n = min(task, size - offset)
            dst = memoryview(buffers[slot])[:n]
            if method == "window":
                with runner_ext.FileWindow(fd, offset, n) as w:
                    _hash_pieces(dst, w.copy_into)
            elif method == "mapped":
                _hash_pieces(dst, lambda p, piece: whole.copy_into(offset + p, piece))
            elif method == "pread":
                _hash_pieces(dst, lambda p, piece: os.preadv(fd, [piece], offset + p))
            else:
                src = memoryview(source)
                _hash_pieces(
                    dst, lambda p, piece: piece.__setitem__(slice(None), src[p : p + len(piece)])
                )
        finally:
            free.append(slot)

    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(0, min(size, task * threads), task)))  # buffers touched once
        started = time.perf_counter()
        list(pool.map(one, range(0, size, task)))
        return size / (time.perf_counter() - started) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--task-mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    size, task = int(args.gib * 2**30), args.task_mib << 20
    out = {
        "gib": args.gib,
        "threads": args.threads,
        "task_mib": args.task_mib,
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="aotiserve-file-read-") as tmp:
        path = Path(tmp) / "blob"
        with open(path, "wb") as f:
            chunk = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
            for _ in range(0, size, len(chunk)):
                f.write(chunk)
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        whole = runner_ext.FileWindow(fd, 0, size)  # also brings the file into the page cache
        try:
            for method in ("memcpy", "window", "mapped", "pread"):
                rates = [
                    run(method, fd, size, args.threads, task, whole) for _ in range(args.rounds)
                ]
                out[f"{method}_gb_s"] = rates
                print(f"{method:<7} {' '.join(f'{r:6.2f}' for r in rates)} GB/s", flush=True)
        finally:
            whole.close()
            os.close(fd)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
