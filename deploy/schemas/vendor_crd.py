"""Writes the OpenAPI schema of a CustomResourceDefinition as JSON, for tests/ to validate
manifests against offline (deploy/schemas/README.md says where each file came from).

    python deploy/schemas/vendor_crd.py CRD.yaml OUT.json --source URL

Takes the storage version's ``openAPIV3Schema``, drops the ``description`` texts (they
are most of the bytes and validate nothing) and records the source URL and the sha256
of the CRD file it read, so a re-run can be checked against upstream.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import yaml


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def extract(crd_text: str, source: str) -> dict:
    crd = yaml.safe_load(crd_text)
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"not a CustomResourceDefinition: kind {crd.get('kind')!r}")
    spec = crd["spec"]
    (version,) = [v for v in spec["versions"] if v.get("storage")]
    return {
        "source": source,
        "source_sha256": hashlib.sha256(crd_text.encode()).hexdigest(),
        "group": spec["group"],
        "kind": spec["names"]["kind"],
        "version": version["name"],
        "scope": spec["scope"],
        "schema": _strip(version["schema"]["openAPIV3Schema"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", help="the CRD's YAML file ('-': stdin)")
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--source", required=True, help="where the CRD file came from (URL)")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.crd == "-" else Path(args.crd).read_text()
    out = extract(text, args.source)
    args.out.write_text(json.dumps(out, indent=None, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{args.out}: {out['group']}/{out['version']} {out['kind']} from {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
