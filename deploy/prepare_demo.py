"""Compiles the built-in demo model at image build time (builder stage).

The runtime image carries no C++ compiler, so the package that
`aotiserve serve` serves when no model repository is given is compiled here,
into the cache folder the daemon reads (AOTISERVE_DEMO_CACHE_DIR in the
image), and loaded and run once to prove it.
"""

from __future__ import annotations

import sys

import torch

from aotiserve import runner_ext
from aotiserve.server.demo import demo_module, ensure_demo_package


def main(cache_dir: str) -> int:
    path = ensure_demo_package(cache_dir)
    loaded = runner_ext.load_model(path, device="cpu")
    x = torch.randn(3, 8)
    (got,) = loaded.runner.run([x])
    with torch.no_grad():
        want = demo_module()(x)
    torch.testing.assert_close(got, want)
    print(f"demo model: {path} ({path.stat().st_size} bytes), runs and matches eager")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
