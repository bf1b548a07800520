"""Turns a results dict into docs/benchmarks.md, PNG plots and a console table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")

ORDER = ("inproc", "echo", "echo_aio", "native", "fast", "client", "oip", "kserve", "pytriton")
SHORT = {"inproc": "in-process", "echo": "grpcio echo", "echo_aio": "grpc.aio echo", "native": "aotiserve Run", "fast": "aotiserve Run (native port)", "client": "aotiserve client",
         "oip": "aotiserve OIP", "kserve": "KServe", "pytriton": "PyTriton"}


def _matplotlib():
    """matplotlib, installed from bench/requirements.txt on first use."""
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
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
    names = [n for n in ("aotiserve", "kserve", "pytriton") if n in mem]
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

    present = [k for k in ("echo", "native", "fast", "oip", "kserve", "pytriton") if k in summary]
    if present:
        out.append("- Tiny model p50 (1 client): " + ", ".join(f"{SHORT[k]} {_f(p50(k))} µs" for k in present)
                   + (f"; in-process {_f(p50('inproc'))} µs" if "inproc" in summary else "") + ".")
        out.append("- Tiny model throughput, 8 clients: " + ", ".join(f"{SHORT[k]} {_f(rps8(k))} req/s"
                                                                        for k in present) + ".")
        cpu = [(k, summary[k].get("server_cpu_us_per_call")) for k in present]
        if any(v for _, v in cpu):
            out.append("- Server CPU per tiny call: " + ", ".join(f"{SHORT[k]} {_f(v)} µs" for k, v in cpu if v) + ".")
    c = results.get("compute")
    if c:
        fast = (f"; on the native data port {_f(c['fast_scaling_2_over_1'], '{:.2f}')}×"
                if c.get("fast_scaling_2_over_1") else "")
        out.append(f"- Compute-bound model, 2 clients ÷ 1 on aotiserve: {_f(c['aotiserve_scaling_2_over_1'], '{:.2f}')}×{fast} "
                   f"(the same package in-process with 2 threads, measured alongside: "
                   f"{_f(c['inproc_scaling_2_over_1'], '{:.2f}')}×).")
    g = results.get("large")
    if g:
        probe = g.get("copy_probe", {})
        fast = g.get("fast", {})
        fast_txt = (f"{_f(g.get('fast_gbps_round_trip'), '{:.2f}')} GB/s on the native data port "
                    f"({_f(fast.get('server_copies'), '{:.2f}')} payload copies made by the port per request), "
                    if fast else "")
        best = (f"best path {g.get('best_path')}: {_f(g.get('best_gbps_round_trip'), '{:.2f}')} GB/s; "
                if g.get("best_path") else "")
        out.append(f"- 64 MiB in + 64 MiB out: {best}{fast_txt}{_f(g['gbps_round_trip'], '{:.2f}')} GB/s on the main "
                   f"port, {_f(g.get('echo_gbps_round_trip'), '{:.2f}')} GB/s through a bare grpcio echo; the main "
                   f"port's Run path makes {_f(probe.get('server_copies'))} payload copy "
                   f"(grpcio adds {_f(probe.get('grpcio_copies'))} of its own, as for any grpcio server).")
    mem = results.get("memory", {})
    if mem:
        out.append("- Daemon RSS at rest / peak under load (MiB, process tree): " + ", ".join(
            f"{n} {_f(mem[n]['at_rest']['tree_rss_mib'])} / {_f(mem[n].get('under_load_peak', {}).get('tree_rss_mib'))}"
            for n in ("aotiserve", "kserve", "pytriton") if n in mem) + ".")
    return out


def _ratio_rows(r: dict) -> list[str]:
    acc = r.get("acceptance", {})
    rows = [
        ("Tiny p50: aotiserve ÷ echo floor", "native_p50_over_echo_p50"),
        ("Tiny p50: aotiserve ÷ KServe", "native_p50_over_kserve_p50"),
        ("8 clients: aotiserve ÷ echo floor", "native_rps8_over_echo"),
        ("8 clients: aotiserve ÷ KServe", "native_rps8_over_kserve"),
        ("8 clients: aotiserve ÷ PyTriton", "native_rps8_over_pytriton"),
        ("Tiny p50: aotiserve native data port ÷ echo floor", "fast_p50_over_echo_p50"),
        ("Tiny p50: aotiserve native data port ÷ KServe", "fast_p50_over_kserve_p50"),
        ("8 clients: aotiserve native data port ÷ echo floor", "fast_rps8_over_echo"),
        ("8 clients: aotiserve native data port ÷ KServe", "fast_rps8_over_kserve"),
        ("8 clients: aotiserve native data port ÷ PyTriton", "fast_rps8_over_pytriton"),
        ("Compute-bound: 2 clients ÷ 1 client", "compute_scaling_2_over_1"),
        ("Compute-bound: 2 clients ÷ 1 client, native data port", "fast_compute_scaling_2_over_1"),
        ("64 MiB round trip, GB/s (in+out)", "large_gbps_round_trip"),
        ("64 MiB: payload copies made in the server", "large_server_copies"),
        ("64 MiB round trip, GB/s (in+out), best aotiserve path", "best_large_gbps_round_trip"),
        ("64 MiB: payload copies made in the server, native data port", "fast_large_server_copies"),
    ]
    out = ["| ratio | value | target | met |", "|---|---|---|---|"]
    for label, key in rows:
        a = acc.get(key, {})
        met = {True: "yes", False: "**no**", None: "–"}[a.get("met")]
        out.append(f"| {label} | {_f(r.get(key), '{:.2f}')} | {a.get('target', '')} | {met} |")
    extra = [
        ("CPU-bound capacity (2 cores ÷ CPU per call): aotiserve ÷ echo floor", "native_cpu_capacity_over_echo"),
        ("CPU-bound capacity: aotiserve ÷ KServe", "native_cpu_capacity_over_kserve"),
        ("CPU-bound capacity: aotiserve ÷ PyTriton", "native_cpu_capacity_over_pytriton"),
        ("Tiny p50: aotiserve OIP ÷ KServe", "oip_p50_over_kserve_p50"),
        ("8 clients: aotiserve OIP ÷ KServe", "oip_rps8_over_kserve"),
        ("Tiny p50: aotiserve.client ÷ echo floor", "client_p50_over_echo_p50"),
        ("8 clients: aotiserve.client ÷ echo floor", "client_rps8_over_echo"),
    ]
    for label, key in extra:
        if r.get(key) is not None:
            out.append(f"| {label} | {_f(r.get(key), '{:.2f}')} | | |")
    return out


def summary_table(results: dict) -> str:
    lines = [f"machine: {results['meta']['machine'].get('name')}  ({results['meta']['machine'].get('cpu_model', '')})"]
    lines.append(f"{'system':<46}{'p50 µs':>9}{'p99 µs':>9}" + "".join(
        f"{'c' + c:>9}" for c in ("1", "4", "8", "16")))
    for s, d in _systems(results):
        lines.append(f"{d['label']:<46}{_f(d['sequential']['p50_us']):>9}{_f(d['sequential']['p99_us']):>9}" + "".join(
            f"{_f(d['rps'].get(c)):>9}" for c in ("1", "4", "8", "16")))
    r = results.get("ratios", {})
    for k, v in r.get("acceptance", {}).items():
        lines.append(f"  {k:<34} {_f(v['value'], '{:.2f}'):>7}  target {v['target']:<7} met={v['met']}")
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
        f"Raw figures: [`{rel(json_path)}`]({rel(json_path)}).",
        "",
        f"- **Machine**: {m.get('name')} — {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs, "
        f"{m.get('mem_total_mib', '?')} MiB RAM; torch {m.get('torch')}, grpcio {m.get('grpcio')}, "
        f"Python {m.get('python')}; commit `{m.get('git_commit', '?')}`"
        + (f" plus uncommitted changes to {', '.join(f'`{x}`' for x in m['uncommitted'])}" if m.get("uncommitted") else "")
        + f"; {meta['date']}.",
        f"- **Command**: `{meta['command']}` ({meta.get('wall_s', '?')} s).",
        f"- **Method**: every client is a separate process from its server, and client and server share the "
        f"same {m.get('cpus')} cores, so absolute figures are noisy (differences under ~30% between runs are "
        f"noise); ratios come from one run. All tiny-model servers are up together and measured round-robin "
        f"over {settings.get('rounds')} round(s); each figure is the median over rounds. Sequential latency: "
        f"{settings.get('seq_n')} calls after {settings.get('warmup')} warm-up calls, one client. Throughput: "
        f"{settings.get('duration'):.1f} s windows with 1/4/8/16 concurrent clients run as "
        f"**{settings.get('mode')}** of one client process, each with its own channel; req/s is the rate in the "
        f"median 0.25 s slice of the window (other work on this machine stalls a window now and then; the "
        f"window means are in the JSON as `rps_window_mean`). Every server process "
        f"runs with OMP_NUM_THREADS=1. CPU µs/call is the process tree's user+system CPU time over every call "
        f"the client made (warm-ups included): it is what decides throughput when client and server share "
        f"two cores, and it is steadier than wall-clock figures when the machine is busy.",
        f"- **Machine load**: 1-minute load average {_f(meta.get('loadavg_start', [None])[0], '{:.1f}')} at the "
        f"start and {_f((meta.get('loadavg_end') or [None])[0], '{:.1f}')} at the end on {m.get('cpus')} CPUs "
        f"(other work shares this machine; above ~{m.get('cpus')} the figures are squeezed).",
        "",
        "## Headline",
        "",
        *_headline(results),
        "",
        "## Tiny model: [1,64] float32 → [1,10] (the zoo's `mlp`)",
        "",
        "| system | p50 µs | p90 µs | p99 µs | req/s ×1 | ×4 | ×8 | ×16 | p50 µs at ×8 | server CPU µs/call "
        "| client CPU µs/call | CPU-bound capacity req/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, d in _systems(results):
        q = d["sequential"]
        L.append(f"| {d['label']} | {_f(q['p50_us'])} | {_f(q['p90_us'])} | {_f(q['p99_us'])} | "
                 + " | ".join(_f(d["rps"].get(c)) for c in ("1", "4", "8", "16"))
                 + f" | {_f(d.get('p50_us_under_load', {}).get('8'))} | {_f(d.get('server_cpu_us_per_call'))}"
                 f" | {_f(d.get('client_cpu_us_per_call'))} | {_f(d.get('cpu_capacity_rps'))} |")
    pb = results.get("payload_bytes")
    if pb:
        L += ["", f"The echo floor answers a {pb['request']} B request with a {pb['response']} B reply — the "
              "serialized sizes of aotiserve's native tiny request and response — through a generic handler "
              "(bytes in, bytes out, ThreadPool(8)). The in-process row calls the extension's `run` on the "
              "same package (throughput there is threads on one container with 2 runners). *CPU-bound capacity* "
              "is the number of CPUs × 10⁶ ÷ (server + client CPU µs per call): the req/s the CPU time per call "
              "allows when client and server share every core. Stalls from other work on the machine move "
              "the measured req/s a lot and this ceiling little, so its ratios are the steadier comparison."]
    L += ["", "## Acceptance ratios (issue 6)", ""] + _ratio_rows(results.get("ratios", {}))

    prof = results.get("profile")
    if prof:
        L += ["", "## Profile of the native Run hot path (py-spy, daemon side)", "",
              "`py-spy record --gil` on the tiny daemon while one client process drives native Run: only the thread "
              "holding the GIL is sampled, so this is the Python work per request — the part that serializes a "
              "grpcio server's threads. Microseconds of GIL time per request.", ""]
        keys = sorted(prof, key=int)
        areas = sorted({a for k in keys for a in prof[k]["areas_self_us_per_request"]})
        L += ["| where (self time) | " + " | ".join(f"{k} client(s)" for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
        for a in areas:
            L.append(f"| {a} | " + " | ".join(_f(prof[k]["areas_self_us_per_request"].get(a), "{:.1f}")
                                               for k in keys) + " |")
        L.append("| **total GIL time per request** | " + " | ".join(
            f"**{_f(prof[k]['gil_us_per_request'], '{:.0f}')}**" for k in keys) + " |")
        k0 = keys[0]
        L += ["", f"Top functions, inclusive, {k0} client(s) ({_f(prof[k0]['rps_during'])} req/s while sampled):", "",
              "| function | µs/request | share |", "|---|---|---|"]
        for row in prof[k0]["top_inclusive"][:18]:
            L.append(f"| `{row['function']}` | {row['us_per_request']:.1f} | {100 * row['share']:.0f}% |")
        warn = [prof[k].get("warning") for k in keys if prof[k].get("warning")]
        if warn:
            L += ["", f"Note: {warn[0]}."]

    lad = results.get("ladder")
    if lad:
        L += ["", "## Where aotiserve's per-request time goes: the echo floor, one layer at a time", "",
              "Δ columns compare each row with the row it builds on; with other work on the machine, differences "
              "under ~50 µs are noise.", "",
              "`bench/ladder_server.py` adds aotiserve's per-request work to the bare echo server layer by layer "
              "(each row includes the ones above it), driven with the same RunRequest bytes. The aotiserve row of "
              "the tiny table above is the whole daemon for comparison.", "",
              "| server | p50 µs | Δ p50 µs | req/s ×8 | server CPU µs/call | Δ CPU µs |",
              "|---|---|---|---|---|---|"]
        by = {row["layer"]: row for row in lad}
        base = {"interceptor": "bare", "torch": "interceptor", "proto": "torch", "fastcodec": "torch",
                "fast_model": "fastcodec", "model_gil": "proto", "model": "proto",
                "trailer": "model", "metrics": "trailer"}
        for row in lad:
            cpu = row["server_cpu_us_per_call"]
            parent = by.get(base.get(row["layer"], ""), {})
            ref, ref_p50 = parent.get("server_cpu_us_per_call"), parent.get("p50_us")
            delta = "" if ref is None or cpu is None else f"{cpu - ref:+.0f}"
            dp50 = "" if ref_p50 is None else f"{row['p50_us'] - ref_p50:+.0f}"
            L.append(f"| {row['label']} | {_f(row['p50_us'])} | {dp50} | {_f(row['rps8'])} | {_f(cpu)} | {delta} |")
        nat = results.get("tiny", {}).get("summary", {}).get("native")
        if nat:
            L.append(f"| aotiserve daemon (native Run), from the tiny table | {_f(nat['sequential']['p50_us'])} | | "
                     f"{_f(nat['rps'].get('8'))} | {_f(nat.get('server_cpu_us_per_call'))} | |")

    c = results.get("compute")
    if c:
        s = c["server_settings"]
        L += ["", "## Compute-bound model: 4 × Linear(1024, 1024), batch 64 (the zoo's `compute`)", "",
              f"aotiserve started with `--runners-per-model {s['runners_per_model']}` and "
              f"OMP_NUM_THREADS={s['OMP_NUM_THREADS']}; clients are threads of one process (each call is "
              "milliseconds of server compute, so client-side GIL is not the limit).", "",
              "| | 1 client req/s | 2 clients req/s | 2 ÷ 1 |", "|---|---|---|---|",
              f"| aotiserve native Run | {_f(c['aotiserve_rps']['1'], '{:.1f}')} | "
              f"{_f(c['aotiserve_rps']['2'], '{:.1f}')} | {_f(c['aotiserve_scaling_2_over_1'], '{:.2f}')} |",
              *([f"| aotiserve native Run, native data port | {_f(c['fast_rps']['1'], '{:.1f}')} | "
                 f"{_f(c['fast_rps']['2'], '{:.1f}')} | {_f(c['fast_scaling_2_over_1'], '{:.2f}')} |"]
                if c.get("fast_rps") else []),
              f"| in-process, 2 runners, 1 vs 2 threads | {_f(c['inproc_rps']['1'], '{:.1f}')} | "
              f"{_f(c['inproc_rps']['2'], '{:.1f}')} | {_f(c['inproc_scaling_2_over_1'], '{:.2f}')} |", "",
              "The in-process row, measured alternately with the daemon, is what the cores gave at the time: "
              "the same container called from 2 threads with no gRPC at all."]
        if (c.get("inproc_scaling_2_over_1") or 0) < 1.7:
            L.append(f"Here it reached only {_f(c['inproc_scaling_2_over_1'], '{:.2f}')}×, so two free cores were "
                     "not available during this run (other work shared the machine) and the daemon's figure "
                     "cannot be judged against the 1.7× target from this run.")
    g = results.get("large")
    if g:
        L += ["", "## Large tensor: 64 MiB in, 64 MiB out (the zoo's `passthrough`, [16384, 1024] float32)", "",
              "Clients, daemon and echo server all run with huge-page malloc "
              f"(`{' '.join(f'{k}={v}' for k, v in g.get('process_env', {}).items())}`; the daemon sets it for "
              "itself, see server/process_env.py). Peak growth: the server's VmHWM over the calls (reset before "
              "them) minus its RSS before, in MiB and in payloads of 64 MiB held at once — every buffer alive at "
              "the peak (gRPC's receive buffers, the joined request, the model's output, the reply), not only "
              "copies made by aotiserve's code.", "",
              "| path | p50 ms | GB/s (in+out bytes ÷ p50 round trip) | server peak growth MiB (payloads) "
              "| payload copies made by the server per request |", "|---|---|---|---|---|"]
        probe = g.get("copy_probe", {})
        for key, label in (("fast", "aotiserve native data port (raw stub)"),
                           ("native", "aotiserve main port, native Run (raw stub)")):
            d = g.get(key)
            if not d:
                continue
            copies = d.get("server_copies") if key == "fast" else probe.get("server_copies")
            L.append(f"| {label} | {_f(d['p50_us'] / 1e3, '{:.1f}')} | {_f(d.get('gbps_round_trip'), '{:.2f}')} | "
                     f"{_f(d.get('peak_growth_mib'), '{:.0f}')} ({_f(d.get('payloads_held_at_peak'), '{:.1f}')}) | "
                     f"{_f(copies, '{:.2f}')} |")
        for key, label in (("fast_client", "aotiserve.client, native data port"),
                           ("client", "aotiserve.client, main port")):
            if key in g:
                L.append(f"| {label} | {_f(g[key]['p50_us'] / 1e3, '{:.1f}')} | "
                         f"{_f(g[key].get('gbps_round_trip'), '{:.2f}')} | | |")
        if "echo" in g:
            L.append(f"| bare grpcio echo, same sizes | {_f(g['echo']['p50_us'] / 1e3, '{:.1f}')} | "
                     f"{_f(g.get('echo_gbps_round_trip'), '{:.2f}')} | | |")
        L += ["", "The native data port's copies are counted by the port itself "
              "(`aotiserve_native_copied_bytes_total` ÷ bytes received): it joins a request that gRPC received in "
              "several slices into one buffer (the one copy), and sends each output of 64 KiB or more straight "
              "from the model's output tensor (no copy). The main port's are counted step by step below."]
        mc = g.get("memcpy")
        if mc:
            L += ["", f"For scale: one 64 MiB copy on this machine during the run took "
                  f"{mc['fresh_ms_per_copy']:.0f} ms into fresh memory ({mc['fresh_gbps']:.2f} GB/s, page faults "
                  f"included, as `bytes`/`tobytes` do without huge pages) and ran at {mc['touched_gbps']:.2f} GB/s "
                  "into memory already touched."]
        probe = g.get("copy_probe")
        if probe:
            L += ["", "### Payload copies in the server, step by step (`python -m bench.copies`)", "",
                  "The server's own Run codec (`server/run_wire.py`) and decoding replayed on one 64 MiB request "
                  "in a fresh process (read back with the generated parser: "
                  f"{'ok' if probe.get('roundtrip_ok') else 'FAILED'}); a step's "
                  "peak memory growth (VmHWM reset before it) divided by the payload size is the number of full "
                  "copies it made, transient ones included. grpcio adds "
                  f"{probe['grpcio_copies']} more outside the server's code (received bytes → Python `bytes`, "
                  "serialized `bytes` → send slice), the same for any grpcio server.", "",
                  "| step | where | peak MiB | copies | ms |", "|---|---|---|---|---|"]
            for st in probe["steps"]:
                L.append(f"| {st['step']} | {st['where']} | {st['peak_growth_mib']:.0f} | {st['copies']} | "
                         f"{_f(st.get('ms'), '{:.0f}')} |")
            L.append(f"| **total made by the server** | | | **{probe['server_copies']}** | "
                     f"{_f(sum(st.get('ms', 0) for st in probe['steps'] if 'model' not in st['where']), '{:.0f}')} |")
    mem = results.get("memory")
    if mem:
        L += ["", "## Memory (tiny model; VmRSS of the daemon process, and of its whole process tree)", "",
              "| server | RSS at rest MiB | tree at rest | peak RSS under load | tree peak under load | VmHWM |",
              "|---|---|---|---|---|---|"]
        for n in ("echo", "echo_aio", "aotiserve", "kserve", "pytriton"):
            if n not in mem:
                continue
            d = mem[n]
            rest, load = d.get("at_rest", {}), d.get("under_load_peak", {})
            L.append(f"| {n} | {_f(rest.get('rss_mib'))} | {_f(rest.get('tree_rss_mib'))} | "
                     f"{_f(load.get('rss_mib'))} | {_f(load.get('tree_rss_mib'))} | "
                     f"{_f(d.get('after', {}).get('hwm_mib'))} |")
        idle = results.get("idle_cpu_percent")
        if idle:
            L += ["", "Idle CPU of each server while all were up and idle (% of one core): "
                  + ", ".join(f"{k} {v:.1f}%" for k, v in idle.items()) + "."]
    if plot_paths:
        L += ["", "## Plots", ""] + [f"![{p.stem}]({rel(p)})" for p in plot_paths]
    notes = results.get("notes")
    if notes:
        L += ["", "## Notes", ""] + [f"- {n.splitlines()[0]}" for n in notes]
    L += ["", "## Peers: how they were run", "",
          "- KServe 0.21.0: `kserve.ModelServer` with a `kserve.Model` whose `load` calls "
          "`torch._inductor.aoti_load_package` and whose `predict` is `async`; KServe's defaults otherwise "
          "(4 gRPC threads, request logging on). Its gRPC/REST binds were moved from `[::]`/`0.0.0.0` to "
          "127.0.0.1 by patching in the launcher process (`bench/peer_kserve.py`).",
          "- PyTriton 0.7.0 (bundled Triton 2.51): one model bound with batching off, the same package loaded "
          "with `aoti_load_package` in the PyTriton process; all endpoints on 127.0.0.1; fresh TMPDIR "
          "workspace; `LD_LIBRARY_PATH` set to the base interpreter's LIBDIR for the Python backend stub "
          "(`bench/peer_pytriton.py`).",
          "- Both are driven by `tritonclient[grpc]==2.73.0` (in its own venv: its protobuf pin clashes with "
          "aotiserve's), the same client as the aotiserve OIP row. Each peer lives in its own venv under "
          "`bench/.peers/`, installed by the bench on first use (`python -m bench.peers install`).",
          "- TorchServe is not included (optional in the issue; see ../shared/peers/NOTES.md for its figures).",
          ""]
    return "\n".join(L)
