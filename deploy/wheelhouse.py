"""Fills a wheelhouse with every wheel the image build installs, for air-gapped builds.

    python deploy/wheelhouse.py wheelhouse/ [--python-version 3.11] [--torch-spec torch==2.13.0]
        [--torch-index-url https://download.pytorch.org/whl/cpu]

Run it where the package index is reachable; then build with
``--build-arg WHEELHOUSE_ONLY=1`` and the build never touches the network for
Python packages. Wheels are for the image's platform (manylinux x86_64) and
Python (3.11 for the Debian bookworm base, 3.12 for Ubuntu 24.04 CUDA bases),
not the host's; versions come from deploy/requirements-image.txt and
deploy/constraints.txt.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--python-version", default="3.11")
    parser.add_argument("--torch-spec", default="torch==2.13.0")
    parser.add_argument(
        "--torch-index-url",
        default=None,
        help="extra index for torch, e.g. https://download.pytorch.org/whl/cpu",
    )
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--python-version",
        args.python_version,
        "--implementation",
        "cp",
        "-c",
        str(HERE / "constraints.txt"),
        "-d",
        str(args.dest),
        "--find-links",
        str(args.dest),
    ]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    if args.torch_index_url:
        cmd += ["--extra-index-url", args.torch_index_url]
    cmd += [args.torch_spec, "-r", str(HERE / "requirements-image.txt")]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
