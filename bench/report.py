"""Turns a results dict into docs/benchmarks.md, PNG plots and a console table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")

ORDER = ("inproc", "echo_cpp", "echo", "run", "oip", "client", "kserve", "pytriton")
SHORT = {
    "inproc": "in-process",
    "echo_cpp": "gRPC C++ echo",
    "echo": "grpcio echo",
    "run": "aotiserve Run",
    "oip": "aotiserve OIP",
    "client": "aotiserve.client",
    "kserve": "KServe",
    "pytriton": "PyTriton",
}


def _matplotlib():
    """matplotlib, installed from bench/requirements.txt on first use."""
    try:
        import matplotlib
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True
        )
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(v, fmt="{:,.0f}", none="–"):
    return none if v is None else fmt.format(v)


def _systems(results: dict) -> list[tuple[str, dict]]:
    summary = results.get("tiny", {}).get("summary", {})
    return [(s, summary[s]) for s in ORDER if s in summary]


def plots(results: dict, img_dir: Path) -> list[Path]:
    systems = _systems(results)
    if not systems:
        return []
    plt = _matplotlib()
    img_dir.mkdir(parents=True, exist_ok=True)
    machine = results["meta"]["machine"].get("name", "")
    out = []

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [SHORT[s] for s, _ in systems]
    p50 = [d["sequential"]["p50_us"] for _, d in systems]
    p99 = [d["sequential"]["p99_us"] for _, d in systems]
    x = range(len(systems))
    ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel("µs per request (sequential, 1 client)")
    ax.set_yscale("log")
    ax.set_title(f"Tiny MLP [1,64]→[1,10] latency — {machine}")
    ax.legend()
    for i, v in enumerate(p50):
        ax.annotate(f"{v:,.0f}", (i - 0.2, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    path = img_dir / "bench-latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    fig, ax = plt.subplots(figsize=(8, 4))
    for s, d in systems:
        if s == "inproc":
            continue
        cs = sorted(int(c) for c in d["rps"])
        ax.plot(cs, [d["rps"][str(c)] for c in cs], marker="o", label=SHORT[s])
    ax.set_xscale("log", base=2)
    ticks = sorted({int(c) for _, d in systems for c in d["rps"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s")
    ax.set_title(f"Tiny MLP throughput (client and server share the cores) — {machine}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = img_dir / "bench-throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    mem = results.get("memory", {})
    names = [n for n in ("echo_cpp", "echo", "aotiserve", "kserve", "pytriton") if n in mem]
    if names:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        rest = [mem[n]["at_rest"]["tree_rss_mib"] for n in names]
        load = [mem[n].get("under_load_peak", {}).get("tree_rss_mib", 0) for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], rest, 0.4, label="at rest")
        ax.bar([i + 0.2 for i in x], load, 0.4, label="peak under load")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("RSS, MiB (whole process tree)")
        ax.set_title("Server memory, tiny MLP")
        ax.legend()
        fig.tight_layout()
        path = img_dir / "bench-memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def _headline(results: dict) -> list[str]:
    summary = results.get("tiny", {}).get("summary", {})
    out = []

    def p50(k):
        return summary.get(k, {}).get("sequential", {}).get("p50_us")

    def rps8(k):
        return summary.get(k, {}).get("rps", {}).get("8")

    present = [
        k
        for k in ("echo_cpp", "echo", "run", "oip", "client", "kserve", "pytriton")
        if k in summary
    ]
    if present:
        out.append(
            "- Tiny model p50 (1 client): "
            + ", ".join(f"{SHORT[k]} {_f(p50(k))} µs" for k in present)
            + (f"; in-process {_f(p50('inproc'))} µs" if "inproc" in summary else "")
            + "."
        )
        out.append(
            "- Tiny model throughput, 8 clients: "
            + ", ".join(f"{SHORT[k]} {_f(rps8(k))} req/s" for k in present)
            + "."
        )
        cpu = [(k, summary[k].get("server_cpu_us_per_call")) for k in present]
        if any(v for _, v in cpu):
            out.append(
                "- Server CPU per tiny call: "
                + ", ".join(f"{SHORT[k]} {_f(v)} µs" for k, v in cpu if v)
                + "."
            )
    c = results.get("compute")
    if c:
        out.append(
            f"- Compute-bound model, 2 clients ÷ 1 on aotiserve: {_f(c['aotiserve_scaling_2_over_1'], '{:.2f}')}× "
            f"(the same package in-process with 2 threads, measured alongside: "
            f"{_f(c['inproc_scaling_2_over_1'], '{:.2f}')}×)."
        )
    g = results.get("large")
    if g:
        floors = ", ".join(
            f"{_f(g[k]['gbps_round_trip'], '{:.2f}')} GB/s through the {SHORT[k]}"
            for k in ("echo_cpp", "echo")
            if k in g
        )
        out.append(
            f"- 64 MiB in + 64 MiB out: {_f(g['gbps_round_trip'], '{:.2f}')} GB/s through aotiserve's Run "
            f"({_f(g['run'].get('port_copies_per_request'), '{:.2f}')} payload copies made by the port per "
            f"request)" + (f"; {floors}" if floors else "") + "."
        )
    mem = results.get("memory", {})
    if mem:
        out.append(
            "- Server RSS at rest / peak under load (MiB, process tree): "
            + ", ".join(
                f"{n} {_f(mem[n].get('at_rest', {}).get('tree_rss_mib'))} / "
                f"{_f(mem[n].get('under_load_peak', {}).get('tree_rss_mib'))}"
                for n in ("aotiserve", "kserve", "pytriton")
                if n in mem
            )
            + "."
        )
    return out


def _ratio_rows(r: dict) -> list[str]:
    from .ratios import INFO

    out = ["| ratio | value | target | met |", "|---|---|---|---|"]
    for key, a in r.get("acceptance", {}).items():
        met = {True: "yes", False: "**no**", None: "– (not measured)"}[a.get("met")]
        out.append(
            f"| {a.get('label', key)} | {_f(a.get('value'), '{:.2f}')} | {a.get('target', '')} | {met} |"
        )
    for key, label in INFO.items():
        if r.get(key) is not None:
            out.append(f"| {label} | {_f(r[key], '{:.2f}')} | | |")
    return out


def summary_table(results: dict) -> str:
    lines = [
        f"machine: {results['meta']['machine'].get('name')}  ({results['meta']['machine'].get('cpu_model', '')})"
    ]
    conc = ("1", "4", "8", "16")
    lines.append(
        f"{'system':<48}{'p50 µs':>9}{'p99 µs':>9}"
        + "".join(f"{'c' + c:>9}" for c in conc)
        + "  hot path"
    )
    for _s, d in _systems(results):
        hot = d.get("hot_path_share")
        lines.append(
            f"{d['label']:<48}{_f(d['sequential']['p50_us']):>9}{_f(d['sequential']['p99_us']):>9}"
            + "".join(f"{_f(d['rps'].get(c)):>9}" for c in conc)
            + (f"  {100 * hot:.0f}%" if hot is not None else "")
        )
    r = results.get("ratios", {})
    lines.append("issue 16 acceptance (ratios measured side by side in this run):")
    for k, v in r.get("acceptance", {}).items():
        lines.append(
            f"  {v.get('label', k):<66} {_f(v['value'], '{:.2f}'):>7}  target {v['target']:<7} "
            f"met={'not measured' if v['met'] is None else v['met']}"
        )
    from .ratios import INFO

    extra = [(label, r[k]) for k, label in INFO.items() if r.get(k) is not None]
    if extra:
        lines.append("measured alongside:")
        lines += [f"  {label:<66} {_f(v, '{:.2f}'):>7}" for label, v in extra]
    for n in results.get("notes", []):
        lines.append(f"note: {n.splitlines()[0]}")
    return "\n".join(lines)


def markdown(results: dict, json_path: Path, plot_paths: list[Path], docs_dir: Path) -> str:
    meta = results["meta"]
    m = meta["machine"]
    settings = meta["settings"]
    rel = lambda p: os.path.relpath(p, docs_dir)  # noqa: E731
    L = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench.run_all`); do not edit by hand. "
        f"Raw figures: [`{rel(json_path)}`]({rel(json_path)}). GPU figures: [benchmarks-gpu.md](benchmarks-gpu.md).",
        "",
        f"- **Machine**: {m.get('name')} — {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs, "
        f"{m.get('mem_total_mib', '?')} MiB RAM; torch {m.get('torch')}, grpcio {m.get('grpcio')}, "
        f"Python {m.get('python')}; commit `{m.get('git_commit', '?')}`"
        + (
            f" plus uncommitted changes to {', '.join(f'`{x}`' for x in m['uncommitted'])}"
            if m.get("uncommitted")
            else ""
        )
        + f"; {meta['date']}.",
        f"- **Command**: `{meta['command']}` ({meta.get('wall_s', '?')} s).",
        "- **What is measured**: aotiserve's one port (gRPC C++ inside the extension; `Run` and OIP `ModelInfer` "
        "answered by its C++ hot path, every other RPC bridged to Python), beside two bare echo floors with the "
        "same payloads — a gRPC C++ sync server built like the port (`bench/echo_server.cc`, compiled on first use "
        "into `.cache/bench/`) and a grpcio server (`bench/echo_server.py`, ThreadPool(8)) — and the peers.",
        "- **One client library for every system**: grpcio with the generated protobuf classes, from the bench's own "
        "interpreter (`bench/driver.py`). Run and both echo floors get the same RunRequest, encoded per call, and "
        "answer a RunResponse that the client parses (the echo floors answer with the very bytes aotiserve "
        "answered); aotiserve's OIP endpoint, KServe and PyTriton get the same ModelInferRequest (inputs in "
        "`raw_input_contents`). The `aotiserve.client` row is the product's client on the same Run, for scale.",
        f"- **Method**: every client is a separate process from its server, and client and server share the "
        f"same {m.get('cpus')} cores, so absolute figures are noisy (differences under ~30% between runs are "
        f"noise); ratios come from one run. All tiny-model servers are up together and measured round-robin "
        f"over {settings.get('rounds')} round(s); each figure is the median over rounds. Sequential latency: "
        f"{settings.get('seq_n')} calls after {settings.get('warmup')} warm-up calls, one client"
        + (
            f", every system's calls in one client process, the systems taking turns in blocks of "
            f"{settings['seq_block']} calls (forwards, then backwards) so that drift in this machine's "
            "speed weighs on all alike"
            if settings.get("seq_block")
            else ""
        )
        + (
            ", with the client process on one CPU and the servers' process trees on the others (as with "
            "a client on another machine; `sched_setaffinity`, given back afterwards); the same calls "
            "sharing the cores as the kernel places them are the *p50 µs sharing cores* column: there a "
            "woken server thread runs on the client's core or on the other one as it goes, and the "
            "figure follows that placement more than the server's work"
            if any("sequential_shared" in d for _, d in _systems(results))
            else ""
        )
        + f". Throughput: "
        f"{settings.get('duration'):.1f} s windows with {'/'.join(str(c) for c in settings.get('concurrency', []))} "
        f"concurrent clients run as **{settings.get('mode')}** of one client process, each with its own channel; "
        f"req/s is the rate in the median 0.25 s slice of the window (other work on this machine stalls a window "
        f"now and then; the window means are in the JSON as `rps_window_mean`). Every server process "
        f"runs with OMP_NUM_THREADS=1. CPU µs/call is the process tree's user+system CPU time over every call "
        f"the client made (warm-ups included). *Hot path* is the share of the calls that the port's "
        f"`aotiserve_hot_path_requests_total` counted as answered in C++.",
        f"- **Machine load**: 1-minute load average {_f(meta.get('loadavg_start', [None])[0], '{:.1f}')} at the "
        f"start and {_f((meta.get('loadavg_end') or [None])[0], '{:.1f}')} at the end on {m.get('cpus')} CPUs "
        f"(other work shares this machine; above ~{m.get('cpus')} the figures are squeezed).",
        "",
        "## Headline",
        "",
        *_headline(results),
        "",
        "## Acceptance ratios (issue 16)",
        "",
        *_ratio_rows(results.get("ratios", {})),
    ]
    systems = _systems(results)
    if systems:
        conc = [str(c) for c in settings.get("concurrency", [1, 4, 8, 16])]
        L += [
            "",
            "## Tiny model: [1,64] float32 → [1,10] (the zoo's `mlp`)",
            "",
            "| system | p50 µs | p90 µs | p99 µs | p50 µs sharing cores | "
            + " | ".join(f"req/s ×{c}" for c in conc)
            + " | p50 µs at ×8 | server CPU µs/call | client CPU µs/call | CPU-bound capacity req/s | hot path |",
            "|---|---|---|---|---|" + "---|" * len(conc) + "---|---|---|---|---|",
        ]
        for _s, d in systems:
            q = d["sequential"]
            shared = d.get("sequential_shared", {}).get("p50_us")
            hot = d.get("hot_path_share")
            L.append(
                f"| {d['label']} | {_f(q['p50_us'])} | {_f(q['p90_us'])} | {_f(q['p99_us'])} | "
                f"{_f(shared) if shared is not None else '–'} | "
                + " | ".join(_f(d["rps"].get(c)) for c in conc)
                + f" | {_f(d.get('p50_us_under_load', {}).get('8'))} | {_f(d.get('server_cpu_us_per_call'))}"
                f" | {_f(d.get('client_cpu_us_per_call'))} | {_f(d.get('cpu_capacity_rps'))} | "
                f"{'' if hot is None else f'{100 * hot:.0f}%'} |"
            )
    pb = results.get("payload_bytes")
    if pb:
        L += [
            "",
            f"Run and the echo floors carry a {pb['request']} B RunRequest and a {pb['response']} B "
            f"RunResponse ({'the bytes aotiserve answered' if pb.get('response_from') == 'aotiserve' else 'built by the bench'}). "
            "The in-process row calls the extension's `run` on the same package (throughput there is threads on "
            "one container with 2 runners). *CPU-bound capacity* is the number of CPUs × 10⁶ ÷ (server + client "
            "CPU µs per call): the req/s the CPU time per call allows when client and server share every core; "
            "stalls from other work on the machine move the measured req/s a lot and this ceiling little.",
        ]

    c = results.get("compute")
    if c:
        s = c["server_settings"]
        L += [
            "",
            "## Compute-bound model: 4 × Linear(1024, 1024), batch 64 (the zoo's `compute`)",
            "",
            f"aotiserve started with `--runners-per-model {s['runners_per_model']}` and "
            f"OMP_NUM_THREADS={s['OMP_NUM_THREADS']}; clients are threads of one process (each call is "
            "milliseconds of server compute, so client-side GIL is not the limit); 1 and 2 clients alternate.",
            "",
            "| | 1 client req/s | 2 clients req/s | 2 ÷ 1 |",
            "|---|---|---|---|",
            f"| aotiserve Run | {_f(c['aotiserve_rps']['1'], '{:.1f}')} | "
            f"{_f(c['aotiserve_rps']['2'], '{:.1f}')} | {_f(c['aotiserve_scaling_2_over_1'], '{:.2f}')} |",
            f"| in-process, 2 runners, 1 vs 2 threads | {_f(c['inproc_rps']['1'], '{:.1f}')} | "
            f"{_f(c['inproc_rps']['2'], '{:.1f}')} | {_f(c['inproc_scaling_2_over_1'], '{:.2f}')} |",
            "",
            "The in-process row, measured alternately with the daemon, is what the cores gave at the time: "
            "the same container called from 2 threads with no gRPC at all.",
        ]
        if (c.get("inproc_scaling_2_over_1") or 0) < 1.75:
            L.append(
                f"Here it reached only {_f(c['inproc_scaling_2_over_1'], '{:.2f}')}×, so two free cores were "
                "not available during this run (other work shared the machine) and the daemon's figure "
                "cannot be judged against the 1.75× target from this run."
            )
    g = results.get("large")
    if g:
        L += [
            "",
            "## Large tensor: 64 MiB in, 64 MiB out (the zoo's `passthrough`, [16384, 1024] float32)",
            "",
            "Clients, daemon and echo servers all run with huge-page malloc "
            f"(`{' '.join(f'{k}={v}' for k, v in g.get('process_env', {}).items())}`; the daemon sets it for "
            "itself, see server/process_env.py). GB/s is in+out bytes ÷ the p50 round trip. Peak growth: the "
            "daemon's VmHWM over the calls (reset before them) minus its RSS before, in MiB and in payloads of "
            "64 MiB held at once. Copies: `aotiserve_port_copied_bytes_total` over the calls ÷ calls ÷ 64 MiB "
            "(the port counts every payload byte it copies).",
            "",
            "| path | p50 ms | GB/s | server peak growth MiB (payloads) | payload copies by the port per request |",
            "|---|---|---|---|---|",
        ]
        d = g["run"]
        L.append(
            f"| aotiserve Run | {_f(d['p50_us'] / 1e3, '{:.1f}')} | {_f(d.get('gbps_round_trip'), '{:.2f}')} | "
            f"{_f(d.get('peak_growth_mib'), '{:.0f}')} ({_f(d.get('payloads_held_at_peak'), '{:.1f}')}) | "
            f"{_f(d.get('port_copies_per_request'), '{:.2f}')} |"
        )
        for key, label in (
            (
                "client",
                "aotiserve.client (shared memory: the daemon is on its host, docs/client.md)",
            ),
            ("echo_cpp", "bare gRPC C++ echo, same bytes"),
            ("echo", "bare grpcio echo, same bytes"),
        ):
            if key in g:
                L.append(
                    f"| {label} | {_f(g[key]['p50_us'] / 1e3, '{:.1f}')} | "
                    f"{_f(g[key].get('gbps_round_trip'), '{:.2f}')} | | |"
                )
        mc = g.get("memcpy")
        if mc:
            L += [
                "",
                f"For scale: one 64 MiB copy on this machine during the run took "
                f"{mc['fresh_ms_per_copy']:.0f} ms into fresh memory ({mc['fresh_gbps']:.2f} GB/s, page faults "
                f"included, as `bytes`/`tobytes` do without huge pages) and ran at {mc['touched_gbps']:.2f} GB/s "
                "into memory already touched.",
            ]
    mem = results.get("memory")
    if mem:
        L += [
            "",
            "## Memory (tiny model; VmRSS of the server process, and of its whole process tree)",
            "",
            "| server | RSS at rest MiB | tree at rest | peak RSS under load | tree peak under load | VmHWM |",
            "|---|---|---|---|---|---|",
        ]
        for n in ("echo_cpp", "echo", "aotiserve", "kserve", "pytriton"):
            if n not in mem:
                continue
            d = mem[n]
            rest, load = d.get("at_rest", {}), d.get("under_load_peak", {})
            L.append(
                f"| {n} | {_f(rest.get('rss_mib'))} | {_f(rest.get('tree_rss_mib'))} | "
                f"{_f(load.get('rss_mib'))} | {_f(load.get('tree_rss_mib'))} | "
                f"{_f(d.get('after', {}).get('hwm_mib'))} |"
            )
        idle = results.get("idle_cpu_percent")
        if idle:
            L += [
                "",
                "Idle CPU of each server while all were up and idle (% of one core): "
                + ", ".join(f"{k} {v:.1f}%" for k, v in idle.items())
                + ".",
            ]
    if plot_paths:
        L += ["", "## Plots", ""] + [f"![{p.stem}]({rel(p)})" for p in plot_paths]
    notes = results.get("notes")
    if notes:
        L += ["", "## Notes", ""] + [f"- {n.splitlines()[0]}" for n in notes]
    L += [
        "",
        "## Peers: how they were run",
        "",
        "- KServe 0.21.0: `kserve.ModelServer` with a `kserve.Model` whose `load` calls "
        "`torch._inductor.aoti_load_package` and whose `predict` is `async`; KServe's defaults otherwise "
        "(4 gRPC threads, request logging on). Its gRPC/REST binds were moved from `[::]`/`0.0.0.0` to "
        "127.0.0.1 by patching in the launcher process (`bench/peer_kserve.py`).",
        "- PyTriton 0.7.0 (bundled Triton 2.51): one model bound with batching off, the same package loaded "
        "with `aoti_load_package` in the PyTriton process; all endpoints on 127.0.0.1; fresh TMPDIR "
        "workspace; `LD_LIBRARY_PATH` set to the base interpreter's LIBDIR for the Python backend stub "
        "(`bench/peer_pytriton.py`).",
        "- Both are driven by the bench's one client (grpcio and the generated Open Inference Protocol "
        "classes, `aotiserve.oip`), exactly as aotiserve's OIP row. Each peer lives in its own venv under "
        "`bench/.peers/`, installed by the bench on first use (`python -m bench.peers install`).",
        "- TorchServe is not included (optional; see ../shared/peers/NOTES.md for its figures).",
        "",
    ]
    return "\n".join(L)
