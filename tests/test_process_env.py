"""Huge pages for large tensors: the environment `aotiserve serve` restarts itself with."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from aotiserve.server import process_env
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import daemon_process


@pytest.mark.parametrize("text, mode", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("garbage\n", None),
])
def test_thp_mode_reads_the_bracketed_setting(tmp_path, text, mode):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert process_env.thp_mode(setting) == mode


def test_thp_mode_is_none_where_the_kernel_has_no_setting(tmp_path):
    assert process_env.thp_mode(tmp_path / "absent") is None


def test_huge_page_env_adds_what_is_missing_and_keeps_the_users_settings():
    assert process_env.huge_page_env({}, "madvise") == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "THP_MEM_ALLOC_ENABLE": "1"}
    assert process_env.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "always") == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        "THP_MEM_ALLOC_ENABLE": "1"}
    # A choice the user made either way stands; nothing left to add: no restart.
    assert process_env.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0",
                                      "THP_MEM_ALLOC_ENABLE": "0"}, "madvise") == {}
    # THP off or unknown: nothing to gain.
    assert process_env.huge_page_env({}, "never") == {}
    assert process_env.huge_page_env({}, None) == {}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _serving(d) -> bool:
    with grpc.insecure_channel(d.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    return status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.skipif(process_env.thp_mode() not in ("always", "madvise"),
                    reason="transparent huge pages are off or unknown here")
def test_the_daemon_restarts_itself_in_place_with_huge_pages():
    with daemon_process(["mlp"]) as d:
        env = _environ(d.proc.pid)  # the same pid serves: exec, not a child
        assert "glibc.malloc.hugetlb=1" in env.get("GLIBC_TUNABLES", ""), env
        assert env.get("THP_MEM_ALLOC_ENABLE") == "1"
        assert _serving(d)
    with daemon_process(["mlp"], ["--no-huge-pages"]) as d:
        env = _environ(d.proc.pid)
        assert "GLIBC_TUNABLES" not in env and "THP_MEM_ALLOC_ENABLE" not in env
        assert _serving(d)
