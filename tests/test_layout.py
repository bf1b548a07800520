"""The code's layout stays as docs/server.md describes it: a core without protobuf, no
import cycles, no test module importing another, and the newcomer's traces true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "server"
CLIENT = REPO / "client" / "src" / "aotiserve" / "client"

# The protocol-neutral core: plain Python types and torch in, plain types out. Protocol
# messages belong to the servicers and their codecs (runner_servicer, runner_codec,
# run_wire, upload_codec, oip_servicer, oip_codec, health, app).
CORE = (
    "batching",
    "buffer_contents",
    "buffer_writes",
    "dataplane",
    "device_pool",
    "input_checks",
    "io_specs",
    "model_registry",
    "model_repository",
    "model_types",
    "model_weights",
    "paths",
    "safetensors_source",
    "served_model",
    "tensor_codec",
    "warmup",
    "weight_loads",
    "weight_transfers",
    "weights",
    "weights_ipc",
    "weights_pull",
    "weights_store",
)
SERVICERS = (
    "runner_servicer",
    "oip_servicer",
    "runner_codec",
    "oip_codec",
    "run_wire",
    "upload_codec",
    "interceptors",
    "bridge",
    "health",
    "app",
)


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` imports (every import, TYPE_CHECKING too)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                if node.module is None:  # from . import x, y: each is a module
                    names.update(f"{base}.{a.name}" for a in node.names)
                    continue
            else:
                mod = node.module or ""
            names.add(mod)
            # from pkg import module
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _graph(folder: Path, package: str) -> dict[str, set[str]]:
    modules = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    return {
        name: {m for m in _imports(path, package) if m in modules and m != name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_core_imports_no_protobuf_and_no_servicer():
    assert all((SERVER / f"{m}.py").is_file() for m in CORE + SERVICERS)
    for name in CORE:
        imported = _imports(SERVER / f"{name}.py", "aotiserve.server")
        pb = sorted(m for m in imported if "_pb2" in m or m.startswith(("grpc", "google.protobuf")))
        assert not pb, f"server/{name}.py imports {pb}: protocol types stay in the servicers"
        servicers = sorted(m for m in imported if m.rsplit(".", 1)[-1] in SERVICERS)
        assert not servicers, f"server/{name}.py imports {servicers}"


@pytest.mark.parametrize(
    "folder,package", [(SERVER, "aotiserve.server"), (CLIENT, "aotiserve.client")]
)
def test_no_import_cycles(folder, package):
    cycle = _cycle(_graph(folder, package))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_test_module_imports_another():
    tests = {p.stem for p in Path(__file__).parent.glob("test_*.py")}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        imported = {m.split(".")[0] for m in _imports(path, "tests")}
        others = sorted((imported & tests) - {path.stem})
        assert not others, (
            f"tests/{path.name} imports test module(s) {others}: share "
            "helpers through tests/helpers.py or conftest.py fixtures"
        )


# `server/dataplane.py:DataPlane.run` or `runner_ext/csrc/port.cpp:Port::flip`, in the
# newcomer's traces of docs/server.md.
TRACE = re.compile(r"`((?:server|runner_ext|client)/[\w/.]+\.(?:py|cpp|h)):([\w.:~]+)`")


def _defined(path: Path, qualname: str) -> bool:
    text = path.read_text()
    if path.suffix == ".py":
        scope: list[ast.AST] = [ast.parse(text)]
        for part in qualname.split("."):
            found = [
                n
                for s in scope
                for n in ast.iter_child_nodes(s)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and n.name == part
            ]
            if not found:
                return False
            scope = found
        return True
    # C++: the last name, defined (followed by "(" and, later, "{") or declared as a class.
    name = qualname.replace("::", r"\s*::\s*")
    return (
        re.search(rf"\b{name}\s*\(", text) is not None
        or re.search(rf"\b(class|struct)\s+{qualname.split('::')[-1]}\b", text) is not None
    )


def test_the_traces_in_docs_server_md_name_real_functions():
    doc = (REPO / "docs" / "server.md").read_text()
    section = doc.split("## From the wire to the runner", 1)
    assert len(section) == 2, "docs/server.md lost its 'From the wire to the runner' section"
    steps = TRACE.findall(section[1].split("\n## ", 1)[0])
    assert len(steps) >= 15, steps
    missing = [
        f"{f}:{q}" for f, q in steps if not (REPO / f).is_file() or not _defined(REPO / f, q)
    ]
    assert not missing, f"docs/server.md names what does not exist: {missing}"
