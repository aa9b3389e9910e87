#!/usr/bin/env python3
"""Turns the raw results of bench/run.sh into markdown tables.

Input: the results directory (fio JSON per server and job, CPU snapshots
before/after each job, RSS samples, server descriptions). Output on stdout.

Ratios are oriented so that > 1.0x always means the agent is better:
throughput rows are agent/nbdkit, latency rows are nbdkit/agent.
"""
import json
import os
import re
import sys
from collections import defaultdict

CLK_TCK = os.sysconf("SC_CLK_TCK")

JOBS = [
    # name, fio direction, label, kind
    ("seqwrite", "write", "seq write 1 MiB QD8", "bw"),
    ("seqread", "read", "seq read 1 MiB QD8", "bw"),
    ("randwrite", "write", "rand write 4 KiB QD32", "iops"),
    ("randread", "read", "rand read 4 KiB QD32", "iops"),
]
LAT = ("lat1", "write")

PAIRS = {
    "buffered": ("nbdkit", "agent-uring-buffered",
                 "buffered: nbdkit file (page cache) vs agent io_uring, direct_io=off"),
    "portable": ("nbdkit", "agent-portable",
                 "buffered: nbdkit file (page cache) vs agent portable engine"),
    "direct": ("nbdkit-nocache", "agent-uring-direct",
               "uncached: nbdkit file cache=none vs agent io_uring, direct_io=on (O_DIRECT)"),
}


def load_fio(res, tag, job, rep):
    with open(os.path.join(res, f"{tag}.{job}.{rep}.json")) as f:
        text = f.read()
    # fio may print warnings before the JSON document.
    return json.loads(text[text.index("{"):])["jobs"][0]


def reps(res):
    with open(os.path.join(res, "reps")) as f:
        return range(1, int(f.read()) + 1)


def metric(res, tag, job, get):
    """The metric `get(fio job json)` of every repetition: (mean, [values])."""
    vals = [get(load_fio(res, tag, job, r)) for r in reps(res)]
    return sum(vals) / len(vals), vals


def short_runs(res, tags, jobs):
    """Sequential runs that ended at the end of the file before RUNTIME:
    [(label, tag, count, runs)] (run.sh does not make them time-based)."""
    try:
        with open(os.path.join(res, "runtime")) as f:
            runtime_ms = 1000 * float(f.read())
    except (OSError, ValueError):
        return []
    out = []
    for job, d, label, kind in jobs:
        if not job.startswith("seq"):
            continue
        for tag in tags:
            _, ms = metric(res, tag, job, lambda j, d=d: j[d]["runtime"])
            n = sum(1 for m in ms if m < 0.95 * runtime_ms)
            if n:
                out.append((label, tag, n, len(ms)))
    return out


def spread(vals):
    """Half the max-min range relative to the mean, in percent."""
    mean = sum(vals) / len(vals)
    return 50 * (max(vals) - min(vals)) / mean if mean else 0.0


def stat_ticks(line):
    """utime+stime of a /proc/.../stat line (fields after the ')' of comm)."""
    rest = line[line.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def stat_comm(line):
    return line[line.index("(") + 1:line.rindex(")")]


def load_snap(path):
    s = {"tasks": {}}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("wall "):
                s["wall"] = float(line.split()[1])
            elif line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                s["total"] = sum(v[:8])
                s["idle"] = v[3] + v[4]
            elif line.startswith("proc ") and ")" in line:
                s["proc"] = stat_ticks(line[5:])
            elif line.startswith("task ") and ")" in line:
                t = line[5:]
                s["tasks"][t.split()[0]] = (stat_comm(t), stat_ticks(t))
    return s


def load_cpu(res, tag, job):
    """Over all repetitions of a job: (machine busy cores, server cores,
    {thread name: cores}); cores = CPU-seconds per wall second."""
    wall = busy = server = 0.0
    threads = defaultdict(float)
    for r in reps(res):
        a = load_snap(os.path.join(res, f"{tag}.{job}.{r}.cpu0"))
        b = load_snap(os.path.join(res, f"{tag}.{job}.{r}.cpu1"))
        wall += b["wall"] - a["wall"]
        busy += ((b["total"] - a["total"]) - (b["idle"] - a["idle"])) / CLK_TCK
        server += (b.get("proc", 0) - a.get("proc", 0)) / CLK_TCK
        for tid, (comm, ticks) in b["tasks"].items():
            before = a["tasks"].get(tid, (comm, 0))[1]
            # io-wq workers are named iou-wrk-PID: group them.
            threads[re.sub(r"-\d+$", "", comm)] += (ticks - before) / CLK_TCK
    return busy / wall, server / wall, {k: v / wall for k, v in threads.items()}


def load_rss(res, tag):
    rss = hwm = 0
    path = os.path.join(res, f"{tag}.rss")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            parts = line.split()
            for i, p in enumerate(parts):
                if p == "VmRSS:":
                    rss = max(rss, int(parts[i + 1]))
                elif p == "VmHWM:":
                    hwm = max(hwm, int(parts[i + 1]))
    return rss, hwm


def desc(res, tag):
    try:
        with open(os.path.join(res, f"{tag}.desc")) as f:
            return f.read().strip()
    except OSError:
        return tag


def result_rows(jobs, ran):
    """The rows of a pair's table, in order: (job, label, summary label,
    get(fio job json), fmt(value), lower_is_better) for each throughput job
    that ran, then the QD1 latency p50 and p99."""
    rows = []
    for job, d, label, kind in jobs:
        if kind == "bw":
            get, unit = (lambda j, d=d: j[d]["bw_bytes"] / 2**20), "MiB/s"
        else:
            get, unit = (lambda j, d=d: j[d]["iops"]), "IOPS"
        rows.append((job, label, label, get, lambda v, unit=unit: f"{v:.0f} {unit}", False))
    job, d = LAT
    for pct, key in (("p50", "50.000000"), ("p99", "99.000000")) if job in ran else ():
        rows.append((job, f"QD1 rand write 4 KiB latency {pct} (lower is better)", f"QD1 write {pct}",
                     lambda j, key=key: j[d]["lat_ns"]["percentile"][key] / 1000,
                     lambda v: f"{v:.1f} µs", True))
    return rows


def ratio(agent, other, lower_is_better):
    """agent vs other, oriented so that > 1.0 means the agent is better."""
    num, den = (other, agent) if lower_is_better else (agent, other)
    return num / den if den else float("nan")


def direct_refs(res):
    """The O_DIRECT reference tags run.sh added to the direct pair (may be [])."""
    try:
        with open(os.path.join(res, "direct_refs")) as f:
            return f.read().split()
    except OSError:
        return []


def print_direct_refs(res, jobs, ran, base, agent):
    """The direct pair's references: qemu-nbd cache=none (an NBD server that,
    like the agent, replies after the device completed) and fio on the
    backing file without any server. They show what the pair's rows are
    bounded by; the targets stay agent vs nbdkit."""
    refs = direct_refs(res)
    if not refs:
        return
    print("\nO_DIRECT references, same run (every job alternated with the two servers above): "
          + "; ".join(f"`{t}` = {desc(res, t)}" for t in refs)
          + ". nbdkit `cache=none` replies once a write is in the page cache; qemu-nbd "
          "after the device completed it; the agent after the device too, except a small "
          "write alone on its connection (the QD1 job), which it answers from the page cache "
          "like nbdkit (`write_behind`); `device` is that device with no NBD in between. Ratio: agent vs qemu-nbd, > 1.0x = agent better."
          + ("" if "qemu-direct" in refs else
             " **No qemu-nbd reference in this run: qemu-nbd was not installed** "
             "(`apt-get install qemu-utils`).")
          + "\n")
    print("| job | nbdkit cache=none | agent | " + " | ".join(refs)
          + (" | agent vs qemu-nbd |" if "qemu-direct" in refs else " |"))
    print("|---|---:|---:|" + "---:|" * len(refs) + ("---:|" if "qemu-direct" in refs else ""))
    tags = [base, agent] + refs
    for job, label, _, get, fmt, lower in result_rows(jobs, ran):
        vals = [metric(res, t, job, get) for t in tags]
        row = f"| {label} | " + " | ".join(f"{fmt(m)} ±{spread(v):.0f}%" for m, v in vals) + " |"
        if "qemu-direct" in refs:
            r = ratio(vals[1][0], vals[tags.index("qemu-direct")][0], lower)
            row += f" {r:.2f}x |" if r == r else " - |"  # nan: a zero figure
        print(row)


def fmt_ratio(r):
    mark = "" if r >= 1.0 else " **(below 1.0)**"
    return f"{r:.2f}x{mark}"


def main():
    res = sys.argv[1]
    with open(os.path.join(res, "pairs")) as f:
        pairs = f.read().split()
    try:
        with open(os.path.join(res, "meta")) as f:
            meta = f.read().strip()
    except OSError:
        meta = ""
    if meta:
        print("\n".join(f"- {m}" for m in meta.splitlines()))
        print()
    print("Ratio: > 1.0x means the agent is better, on every row "
          "(throughput: agent/nbdkit; latency: nbdkit/agent). Values are means over the runs; "
          "±N% = half the min-max range across runs (0% with a single run).")
    try:
        with open(os.path.join(res, "jobs")) as f:
            ran = set(f.read().split())
    except OSError:
        ran = {j[0] for j in JOBS} | {LAT[0]}
    jobs = [j for j in JOBS if j[0] in ran]
    cpu_jobs = jobs + ([(LAT[0], LAT[1], "QD1 rand write 4 KiB", "lat")] if LAT[0] in ran else [])
    summary = []
    for p in pairs:
        base, agent, title = PAIRS[p]
        print(f"\n### {title}\n")
        print(f"- baseline: {desc(res, base)}")
        print(f"- agent: {desc(res, agent)}\n")
        print("| job | nbdkit | agent | ratio (>1 = agent better) |")
        print("|---|---:|---:|---:|")
        ratios = []
        for job, label, short_label, get, fmt, lower in result_rows(jobs, ran):
            (mx, vx), (my, vy) = metric(res, base, job, get), metric(res, agent, job, get)
            r = ratio(my, mx, lower)
            print(f"| {label} | {fmt(mx)} ±{spread(vx):.0f}% | {fmt(my)} ±{spread(vy):.0f}% | {fmt_ratio(r)} |")
            ratios.append((short_label, r))
        short = short_runs(res, (base, agent), jobs)
        summary.append((p, ratios))
        if p == "direct":
            print_direct_refs(res, jobs, ran, base, agent)
            short += short_runs(res, direct_refs(res), jobs)
        if short:
            by_job = defaultdict(list)
            for label, tag, n, total in short:
                by_job[label].append(f"{tag} {n} of {total}")
            print("\nRuns that reached the end of the file before the measured time was up "
                  "(sequential jobs pass over the file once; a larger SIZE_MIB keeps them running "
                  "for all of RUNTIME; their figures cover a shorter time): "
                  + "; ".join(f"{label}: {', '.join(v)}" for label, v in by_job.items()) + ".")

        # CPU evidence: who is busy, and how much CPU each server spends per I/O.
        print(f"\nCPU during the jobs ({p}). cores = CPU-seconds per wall second, summed over "
              f"threads (the machine has {os.cpu_count()}); µs/op = the server's CPU time per I/O; "
              "fio = the client; machine = every process on the box, other work included.\n")
        print("| job | nbdkit cores | agent cores | nbdkit µs/op | agent µs/op | fio cores (nbdkit / agent run) "
              "| machine busy cores (nbdkit / agent run) | agent's busiest threads (cores) |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for job, d, label, _ in cpu_jobs:
            fio_cores, busy, cores, per_op = [], [], [], []
            threads = {}
            for tag in (base, agent):
                # usr_cpu/sys_cpu: percent of one CPU over the job's runtime.
                fc, _ = metric(res, tag, job, lambda j: (j["usr_cpu"] + j["sys_cpu"]) / 100)
                iops, _ = metric(res, tag, job, lambda j, d=d: j[d]["iops"])
                b, srv, th = load_cpu(res, tag, job)
                fio_cores.append(fc)
                busy.append(b)
                cores.append(srv)
                per_op.append(srv / iops * 1e6 if iops else float("nan"))
                threads = th
            top = sorted(threads.items(), key=lambda kv: -kv[1])[:3]
            tops = ", ".join(f"{n} {c:.2f}" for n, c in top if c >= 0.01) or "-"
            row = [label, f"{cores[0]:.2f}", f"{cores[1]:.2f}", f"{per_op[0]:.1f}", f"{per_op[1]:.1f}",
                   f"{fio_cores[0]:.2f} / {fio_cores[1]:.2f}", f"{busy[0]:.2f} / {busy[1]:.2f}", tops]
            print("| " + " | ".join(row) + " |")

    print("\n### Memory (sampled every 0.1 s over the server's life; VmHWM = kernel-tracked peak)\n")
    print("| server | peak VmRSS | VmHWM |")
    print("|---|---:|---:|")
    seen = set()
    for p in pairs:
        extra = [t for t in direct_refs(res) if t != "device"] if p == "direct" else []
        for tag in list(PAIRS[p][:2]) + extra:
            if tag in seen:
                continue
            seen.add(tag)
            r = load_rss(res, tag)
            if r:
                print(f"| {desc(res, tag)} | {r[0] / 1024:.1f} MiB | {r[1] / 1024:.1f} MiB |")

    print("\n### Summary of ratios (>1.0x = agent better)\n")
    labels = [lbl for lbl, _ in summary[0][1]]
    print("| pair | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for p, ratios in summary:
        print(f"| {p} | " + " | ".join(fmt_ratio(r) for _, r in ratios) + " |")


if __name__ == "__main__":
    main()
