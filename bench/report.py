"""`report.md` and `chart.png` from `results.json`: medians of the runs, ratios to nginx, and the
issue's targets met or missed.

"Added" figures are taken within each run (the target's figure minus the upstream's own, measured
directly in the same run) and then the median of the runs is reported.

    python bench/report.py [bench/results]      # re-render without re-running
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stats import median, ratio

SERVICE_STREAMS = ("service /v1", "service /chat messages", "service /chat message")
CHAT = ("service /chat messages", "service /chat message")
# The targets (issue 6), for the service on one core.
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 3.0
TARGET_RPS = 1000
TARGET_STREAMS = 1000
TARGET_FIRST_CHUNK_P50_MS = 300.0
TARGET_LAG_P99_MS = 100.0
TARGET_MEMORY_MB = 120.0
TARGET_CHAT_RATIO = 1.5


# Aggregation ------------------------------------------------------------------------------------


def latency_table(results: dict) -> dict:
    runs = results.get("latency", {})
    direct = runs.get("direct", [])
    table = {}
    for target, summaries in runs.items():
        row = {
            "p50": median(s["p50_us"] / 1000 for s in summaries),
            "p99": median(s["p99_us"] / 1000 for s in summaries),
            "requests": median(s["requests"] for s in summaries),
        }
        if target != "direct":
            row["added_p50"] = median(
                (s["p50_us"] - d["p50_us"]) / 1000 for s, d in zip(summaries, direct, strict=False)
            )
            row["added_p99"] = median(
                (s["p99_us"] - d["p99_us"]) / 1000 for s, d in zip(summaries, direct, strict=False)
            )
        table[target] = row
    return table


def throughput_table(results: dict) -> dict:
    table = {}
    for target, summaries in results.get("throughput", {}).items():
        table[target] = {
            "rps": median(s["rps"] for s in summaries),
            "errors": median(s["errors"] for s in summaries),
            "errors_total": sum(s["errors"] for s in summaries),
            "cpu_us_per_request": median(
                s["cpu_s"] / s["requests"] * 1e6 for s in summaries if s["requests"]
            ),
        }
    return table


def streams_table(results: dict) -> dict:
    """{size: {target: row}}."""
    tables = {}
    for size, targets in results.get("streams", {}).items():
        direct = targets.get("direct", [])
        rows = {}
        for target, summaries in targets.items():
            pairs = list(zip(summaries, direct, strict=False))
            row = {
                "completed": median(s["completed"] for s in summaries),
                "completed_min": min(s["completed"] for s in summaries),
                "ttfc_p50": median(s["ttfc_ms"]["50"] for s in summaries),
                "ttfc_p99": median(s["ttfc_ms"]["99"] for s in summaries),
                "lag_p99": median(s["lag_ms"]["99"] for s in summaries),
                "rss": median(s["peak_rss_mb"] for s in summaries),
                "pss": median(s["peak_pss_mb"] for s in summaries),
                "cpu_us_per_chunk": median(
                    s["cpu_s"] / s["chunks"] * 1e6 for s in summaries if s["chunks"]
                ),
            }
            if target != "direct":
                row["added_ttfc_p50"] = median(
                    _minus(s["ttfc_ms"]["50"], d["ttfc_ms"]["50"]) for s, d in pairs
                )
                row["added_ttfc_p99"] = median(
                    _minus(s["ttfc_ms"]["99"], d["ttfc_ms"]["99"]) for s, d in pairs
                )
            rows[target] = row
        tables[int(size)] = rows
    return dict(sorted(tables.items()))


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# Targets ----------------------------------------------------------------------------------------


def verdicts(latency: dict, throughput: dict, streams: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, met?, margin) rows for the issue's list."""
    rows = []

    def check(name: str, value: float | None, limit: float, unit: str, at_most: bool = True):
        if value is None:
            rows.append((name, "not measured", "—", ""))
            return
        met = value <= limit if at_most else value >= limit
        if met:
            margin = f"{_num(abs(limit - value))} {unit} to spare"
        else:
            times = value / limit if at_most else limit / value if value else float("inf")
            margin = f"missed by {_num(abs(value - limit))} {unit} ({times:.2g}× the target)"
        rows.append((name, f"{_num(value)} {unit}", "met" if met else "**missed**", margin))

    service = latency.get("service", {})
    check("added p50 latency ≤ 1.0 ms (c=1)", service.get("added_p50"), TARGET_ADDED_P50_MS, "ms")
    check("added p99 latency ≤ 3 ms (c=1)", service.get("added_p99"), TARGET_ADDED_P99_MS, "ms")
    rps = throughput.get("service", {})
    check("≥ 1,000 req/s at c=64", rps.get("rps"), TARGET_RPS, "req/s", at_most=False)
    if rps:
        errors = rps["errors_total"]
        rows.append(
            ("… with no errors", f"{errors} errors", "met" if errors == 0 else "**missed**", "")
        )
    at = streams.get(TARGET_STREAMS, {})
    v1 = at.get("service /v1")
    if v1:
        completed = v1["completed_min"]
        rows.append(
            (
                "1,000 concurrent streams all complete",
                f"{completed:.0f} of 1,000 (worst run)",
                "met" if completed >= TARGET_STREAMS else "**missed**",
                "" if completed >= TARGET_STREAMS else f"{TARGET_STREAMS - completed:.0f} short",
            )
        )
        check(
            "added first-chunk p50 ≤ 300 ms (1,000 streams)",
            v1.get("added_ttfc_p50"),
            TARGET_FIRST_CHUNK_P50_MS,
            "ms",
        )
        check("p99 chunk lag ≤ 100 ms (1,000 streams)", v1.get("lag_p99"), TARGET_LAG_P99_MS, "ms")
        check("peak memory ≤ 120 MB (RSS of the tree)", v1.get("rss"), TARGET_MEMORY_MB, "MB")
        for chat in CHAT:
            row = at.get(chat)
            if not row:
                continue
            worst = max(
                (
                    r
                    for r in (
                        ratio(row.get("added_ttfc_p50"), v1.get("added_ttfc_p50")),
                        ratio(row.get("lag_p99"), v1.get("lag_p99")),
                        ratio(row.get("rss"), v1.get("rss")),
                    )
                    if r is not None
                ),
                default=None,
            )
            label = chat.removeprefix("service ")
            check(f"{label} streaming within 1.5× /v1 (worst ratio)", worst, TARGET_CHAT_RATIO, "×")
    return rows


# Markdown ---------------------------------------------------------------------------------------


def _num(value: float) -> str:
    """Three significant digits, never in exponent form."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.2g}"


def _f(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2g}×" if value < 10 else f"{value:,.0f}×"


def markdown(results: dict) -> str:
    meta = results["meta"]
    latency = latency_table(results)
    throughput = throughput_table(results)
    streams = streams_table(results)
    lines = [
        "# Benchmark report",
        "",
        f"{'Quick (smoke) run' if meta['quick'] else 'Full run'} of `make bench`, {meta['date']}, "
        f"commit `{meta['commit']}`; medians of {meta['runs']} run(s). Target on core "
        f"{meta['pinned']['target']}; fake upstream, load generators and sampler on core "
        f"{meta['pinned']['load']}. {meta['cpu']}, {meta['cores']} cores, Python {meta['python']}, "
        f"{meta['nginx']}, {meta['wrk']}. Load average (1 min) {meta['load_average_start'][0]:.2f} "
        f"at the start, {meta['load_average_end'][0]:.2f} at the end; {meta['seconds']} s in all.",
        "",
        "*Added* = the target's figure minus the upstream's own, measured directly in the same run. "
        "Ratios are to nginx (`proxy_pass`, `proxy_buffering off`), the reference limit.",
    ]
    if meta.get("service_overrides"):
        lines += ["", f"Service settings overridden: {', '.join(meta['service_overrides'])}."]
    lines += ["", "## Issue 6 targets (service, one core)", "", "| target | measured | | margin |"]
    lines += ["| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in verdicts(latency, throughput, streams)]

    if latency:
        nginx_added = latency.get("nginx", {})
        lines += [
            "",
            f"## 1. Latency, non-stream `/v1/chat/completions`, concurrency 1 "
            f"({meta['latency_requests']:,} requests a run)",
            "",
            "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | added p50 vs nginx |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for target, row in latency.items():
            lines.append(
                f"| {target} | {_f(row['p50'], 3)} | {_f(row['p99'], 3)} "
                f"| {_f(row.get('added_p50'), 3)} | {_f(row.get('added_p99'), 3)} "
                f"| {_x(ratio(row.get('added_p50'), nginx_added.get('added_p50'))) if target == 'service' else ''} |"
            )
    if throughput:
        nginx_rps = throughput.get("nginx", {}).get("rps")
        lines += [
            "",
            f"## 2. Throughput, concurrency {meta['throughput_connections']} for "
            f"{meta['throughput_seconds']} s",
            "",
            "| target | req/s | vs nginx | errors (all runs) | target CPU µs/request |",
            "| --- | --- | --- | --- | --- |",
        ]
        for target, row in throughput.items():
            lines.append(
                f"| {target} | {_f(row['rps'], 0)} | {_x(ratio(row['rps'], nginx_rps))} "
                f"| {row['errors_total']} | {_f(row['cpu_us_per_request'], 0)} |"
            )
    if streams:
        lines += [
            "",
            "## 3–4. Concurrent streams of 40 chunks every 50 ms",
            "",
            "First chunk is timed from the request's first byte written; chunk lag is the gap "
            "between two chunks beyond the upstream's 50 ms. Memory is the peak of the target's "
            "process tree (gunicorn master + worker; nginx master + worker; for *direct*, the fake "
            "upstream), sampled from `/proc` every 100 ms; PSS counts pages shared after fork "
            "once. CPU is the target's, per chunk delivered. The ratios to nginx are of the "
            "absolute figures (first chunk p50, p99 lag, RSS): nginx adds too little to the first "
            "chunk for a ratio of added times to mean anything.",
            "",
            "| streams | target | completed | added first chunk p50 / p99 ms | p99 chunk lag ms "
            "| peak RSS MB | peak PSS MB | CPU µs/chunk | vs nginx: first chunk p50, lag, RSS |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for size, rows in streams.items():
            nginx = rows.get("nginx", {})
            for target, row in rows.items():
                versus = ""
                if target.startswith("service"):
                    versus = ", ".join(
                        _x(ratio(row.get(key), nginx.get(key)))
                        for key in ("ttfc_p50", "lag_p99", "rss")
                    )
                first = (
                    f"{_f(row['ttfc_p50'], 1)} / {_f(row['ttfc_p99'], 1)} (own)"
                    if target == "direct"
                    else f"{_f(row.get('added_ttfc_p50'), 1)} / {_f(row.get('added_ttfc_p99'), 1)}"
                )
                lines.append(
                    f"| {size:,} | {target} | {row['completed']:.0f} | {first} "
                    f"| {_f(row['lag_p99'], 1)} | {_f(row['rss'], 0)} | {_f(row['pss'], 0)} "
                    f"| {_f(row['cpu_us_per_chunk'], 0)} | {versus} |"
                )
        chat_rows = []
        for size, rows in streams.items():
            v1 = rows.get("service /v1")
            for chat in CHAT:
                row = rows.get(chat)
                if not (v1 and row):
                    continue
                chat_rows.append(
                    f"| {size:,} | {chat.removeprefix('service ')} "
                    f"| {_x(ratio(row.get('added_ttfc_p50'), v1.get('added_ttfc_p50')))} "
                    f"| {_x(ratio(row['lag_p99'], v1['lag_p99']))} "
                    f"| {_x(ratio(row['rss'], v1['rss']))} "
                    f"| {_x(ratio(row['cpu_us_per_chunk'], v1['cpu_us_per_chunk']))} |"
                )
        if chat_rows:
            lines += [
                "",
                "### What the richer `/chat` path costs, as a ratio to `/v1`",
                "",
                "| streams | path | added first chunk p50 | p99 chunk lag | peak RSS | CPU/chunk |",
                "| --- | --- | --- | --- | --- | --- |",
                *chat_rows,
            ]
    lines += [
        "",
        "Reproduce with `make bench` (`BENCH_QUICK=1 make bench` for a smoke run); see "
        "`docs/performance.md`.",
        "",
    ]
    return "\n".join(lines)


# Chart ------------------------------------------------------------------------------------------

COLOURS = {
    "direct": "#888888",
    "nginx": "#2ca02c",
    "service": "#1f77b4",
    "service /v1": "#1f77b4",
    "service /chat messages": "#ff7f0e",
    "service /chat message": "#d62728",
}


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = latency_table(results)
    throughput = throughput_table(results)
    streams = streams_table(results)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4), dpi=80)
    fig.suptitle(
        f"chatgpt-proxy benchmark ({results['meta']['date']}, medians of "
        f"{results['meta']['runs']} run(s), target pinned to one core)",
        fontsize=12,
    )

    ax = axes[0][0]
    names = [t for t in ("nginx", "service") if t in latency]
    for offset, (key, label) in enumerate((("added_p50", "p50"), ("added_p99", "p99"))):
        values = [max(latency[t].get(key) or 0, 1e-3) for t in names]
        bars = ax.bar(
            [i + offset * 0.38 for i in range(len(names))],
            values,
            0.36,
            label=label,
            color=["#2ca02c", "#1f77b4"][: len(names)],
            alpha=1.0 if offset == 0 else 0.55,
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(TARGET_ADDED_P50_MS, color="k", ls="--", lw=0.8, label="target p50 1 ms")
    ax.axhline(TARGET_ADDED_P99_MS, color="k", ls=":", lw=0.8, label="target p99 3 ms")
    ax.set_xticks([i + 0.19 for i in range(len(names))], names)
    ax.set_yscale("log")
    ax.set_ylabel("added latency, ms (log)")
    ax.set_title("1. added latency, c=1 (p50 solid, p99 pale)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    names = list(throughput)
    values = [throughput[t]["rps"] for t in names]
    bars = ax.bar(names, values, color=[COLOURS.get(t, "#555") for t in names])
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(TARGET_RPS, color="k", ls="--", lw=0.8, label="target 1,000 req/s")
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("2. throughput, c=64")
    ax.legend(fontsize=8)

    sizes = list(streams)
    targets = [
        t for t in ("direct", "nginx", *SERVICE_STREAMS) if any(t in streams[s] for s in sizes)
    ]

    def series(ax, key: str, title: str, ylabel: str, target: float | None, skip_direct=False):
        for name in targets:
            if skip_direct and name == "direct":
                continue
            xs = [s for s in sizes if name in streams[s]]
            ys = [streams[s][name].get(key) for s in xs]
            ax.plot(xs, ys, "o-", color=COLOURS.get(name), label=name.removeprefix("service "))
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=0.8, label="target")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)

    for size in sizes:
        for row in streams[size].values():
            row["completed_pct"] = row["completed"] / size * 100
    if sizes:
        series(axes[0][2], "completed_pct", "3/4. streams completed", "% of streams", 100.0)
        axes[0][2].set_ylim(0, 105)
        series(
            axes[1][0],
            "added_ttfc_p50",
            "3/4. added first chunk, p50",
            "ms",
            TARGET_FIRST_CHUNK_P50_MS,
            skip_direct=True,
        )
        series(axes[1][1], "lag_p99", "3/4. p99 chunk lag", "ms", TARGET_LAG_P99_MS)
        series(axes[1][2], "rss", "3/4. peak RSS of the process tree", "MB", TARGET_MEMORY_MB)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    (out / "report.md").write_text(markdown(results))
    chart(results, out / "chart.png")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    write(json.loads((out / "results.json").read_text()), out)
    print(out / "report.md")


if __name__ == "__main__":
    main()
