"""Helpers shared by the deployment tests: render kustomize trees, pick objects, validate
custom resources against their vendored CRD schemas (deploy/schemas)."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SCHEMAS = DEPLOY / "schemas"
OVERLAYS = ("cpu", "gpu")


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(path: Path) -> list[dict]:
    yaml = pytest.importorskip("yaml")
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = by_kind(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def strict(schema):
    """The schema with unknown fields refused wherever the CRD lists its fields (and does
    not keep unknown ones): what `kubectl apply` with strict field validation reports."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(folder: str, filename: str) -> dict:
    vendored = json.loads((SCHEMAS / folder / filename).read_text())
    assert "source" in vendored and len(vendored["source_sha256"]) == 64
    return vendored


def validate_crd(doc: dict, folder: str, filename: str) -> None:
    vendored = crd_schema(folder, filename)
    assert doc["apiVersion"] == f"{vendored['group']}/{vendored['version']}", doc["apiVersion"]
    assert doc["kind"] == vendored["kind"]
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(strict(vendored["schema"]))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        pytest.fail(
            f"{doc['kind']}/{doc['metadata']['name']} invalid for {folder}:\n"
            + "\n".join(
                f"  {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
            )
        )
