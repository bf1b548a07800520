"""The figures a run is judged by: ratios measured side by side, and their targets."""

from __future__ import annotations

# Issue 16's CPU acceptance criteria: key -> (comparison, target, label).
TARGETS = {
    "run_p50_over_echo_cpp_p50": ("<=", 1.15, "Tiny p50: aotiserve Run ÷ gRPC C++ echo floor"),
    "run_p50_over_echo_p50": ("<=", 0.75, "Tiny p50: aotiserve Run ÷ grpcio echo floor"),
    "run_rps8_over_echo_cpp": (">=", 0.85, "8 clients req/s: aotiserve Run ÷ gRPC C++ echo floor"),
    "run_rps8_over_echo": (">=", 1.5, "8 clients req/s: aotiserve Run ÷ grpcio echo floor"),
    "run_rps8_over_kserve": (">=", 3.0, "8 clients req/s: aotiserve Run ÷ KServe 0.21"),
    "run_rps8_over_pytriton": (">=", 8.0, "8 clients req/s: aotiserve Run ÷ PyTriton"),
    "oip_p50_over_run_p50": ("<=", 1.10, "Tiny p50: aotiserve OIP ModelInfer ÷ Run"),
    "oip_rps8_over_run": (">=", 0.90, "8 clients req/s: aotiserve OIP ModelInfer ÷ Run"),
    "compute_scaling_2_over_1": (">=", 1.75, "Compute-bound: 2 clients ÷ 1 client req/s"),
    # What users call: aotiserve.client, which on the daemon's host moves a call's tensors
    # through a shared-memory region (docs/client.md); the common client's figure, bound by
    # the echo floors beside it, is in INFO.
    "large_client_gbps_round_trip": (
        ">=",
        1.5,
        "64 MiB round trip, GB/s (in+out bytes ÷ p50), aotiserve.client",
    ),
}
# Measured alongside, no target: key -> label.
INFO = {
    "echo_cpp_p50_over_echo_p50": "Tiny p50: gRPC C++ echo ÷ grpcio echo",
    "echo_cpp_rps8_over_echo": "8 clients req/s: gRPC C++ echo ÷ grpcio echo",
    "run_p50_over_kserve_p50": "Tiny p50: aotiserve Run ÷ KServe",
    "run_p50_over_pytriton_p50": "Tiny p50: aotiserve Run ÷ PyTriton",
    "oip_rps8_over_kserve": "8 clients req/s: aotiserve OIP ÷ KServe (same protocol)",
    "client_p50_over_run_p50": "Tiny p50: aotiserve.client ÷ the bare grpcio stub",
    "client_rps8_over_run": "8 clients req/s: aotiserve.client ÷ the bare grpcio stub",
    "run_cpu_capacity_over_echo_cpp": "CPU-bound capacity: aotiserve Run ÷ gRPC C++ echo",
    "run_cpu_capacity_over_echo": "CPU-bound capacity: aotiserve Run ÷ grpcio echo",
    "run_cpu_capacity_over_kserve": "CPU-bound capacity: aotiserve Run ÷ KServe",
    "run_hot_path_share": "Tiny Run calls answered by the C++ hot path (share)",
    "oip_hot_path_share": "Tiny ModelInfer calls answered by the C++ hot path (share)",
    "compute_inproc_scaling_2_over_1": (
        "Compute-bound in-process, 2 threads ÷ 1 (what the cores gave)"
    ),
    "large_port_copies_per_request": "64 MiB: payload copies the port made per request",
    "large_echo_cpp_gbps_round_trip": "64 MiB round trip through the gRPC C++ echo, GB/s",
    "large_echo_gbps_round_trip": "64 MiB round trip through the grpcio echo, GB/s",
    "large_gbps_round_trip": "64 MiB round trip through Run, the common grpcio client, GB/s",
}


def ratios(results: dict) -> dict:
    s = results.get("tiny", {}).get("summary", {})

    def p50(x):
        return s.get(x, {}).get("sequential", {}).get("p50_us")

    def rps8(x):
        return s.get(x, {}).get("rps", {}).get("8")

    def div(a, b):
        return a / b if a is not None and b else None

    def cap(x):
        return s.get(x, {}).get("cpu_capacity_rps")

    large = results.get("large", {})
    compute = results.get("compute", {})
    r = {
        "run_p50_over_echo_cpp_p50": div(p50("run"), p50("echo_cpp")),
        "run_p50_over_echo_p50": div(p50("run"), p50("echo")),
        "run_rps8_over_echo_cpp": div(rps8("run"), rps8("echo_cpp")),
        "run_rps8_over_echo": div(rps8("run"), rps8("echo")),
        "run_rps8_over_kserve": div(rps8("run"), rps8("kserve")),
        "run_rps8_over_pytriton": div(rps8("run"), rps8("pytriton")),
        "oip_p50_over_run_p50": div(p50("oip"), p50("run")),
        "oip_rps8_over_run": div(rps8("oip"), rps8("run")),
        "compute_scaling_2_over_1": compute.get("aotiserve_scaling_2_over_1"),
        "large_gbps_round_trip": large.get("gbps_round_trip"),
        "echo_cpp_p50_over_echo_p50": div(p50("echo_cpp"), p50("echo")),
        "echo_cpp_rps8_over_echo": div(rps8("echo_cpp"), rps8("echo")),
        "run_p50_over_kserve_p50": div(p50("run"), p50("kserve")),
        "run_p50_over_pytriton_p50": div(p50("run"), p50("pytriton")),
        "oip_rps8_over_kserve": div(rps8("oip"), rps8("kserve")),
        "client_p50_over_run_p50": div(p50("client"), p50("run")),
        "client_rps8_over_run": div(rps8("client"), rps8("run")),
        "run_cpu_capacity_over_echo_cpp": div(cap("run"), cap("echo_cpp")),
        "run_cpu_capacity_over_echo": div(cap("run"), cap("echo")),
        "run_cpu_capacity_over_kserve": div(cap("run"), cap("kserve")),
        "run_hot_path_share": s.get("run", {}).get("hot_path_share"),
        "oip_hot_path_share": s.get("oip", {}).get("hot_path_share"),
        "compute_inproc_scaling_2_over_1": compute.get("inproc_scaling_2_over_1"),
        "large_port_copies_per_request": large.get("run", {}).get("port_copies_per_request"),
        "large_echo_cpp_gbps_round_trip": large.get("echo_cpp", {}).get("gbps_round_trip"),
        "large_echo_gbps_round_trip": large.get("echo", {}).get("gbps_round_trip"),
        "large_client_gbps_round_trip": large.get("client", {}).get("gbps_round_trip"),
    }
    r["acceptance"] = {
        k: {
            "value": r[k],
            "target": f"{op} {t}",
            "label": label,
            "met": None if r[k] is None else (r[k] <= t if op == "<=" else r[k] >= t),
        }
        for k, (op, t, label) in TARGETS.items()
    }
    return r
