#!/usr/bin/env python3
"""Side-by-side benchmark of a Redis proxy against direct Redis and twemproxy.

Starts its own redis-server and twemproxy (nutcracker) on free loopback ports,
starts the candidate proxy from a command template, then runs redis-benchmark
workloads against every target in rotating order, several rounds, and prints
medians and per-round ratios. Needs: redis-server, redis-benchmark, nutcracker
(Debian packages redis-server, redis-tools, nutcracker).

  cargo build --release
  benches/compare.py --proxy 'target/release/redmux --listen 127.0.0.1:{port} --upstream 127.0.0.1:{upstream}'

--also NAME=CMD adds more candidates to the same run (same template; {tmp} is a scratch folder), e.g.
another build of redmux: --also 'before=/tmp/redmux-before --listen 127.0.0.1:{port} --upstream 127.0.0.1:{upstream}'

Ratios are the figures to quote: absolute numbers drift with machine load.

--upstream-rtt-ms N puts Redis "far away": a relay (benches/delay-relay/, built with cargo on first use) adds
N/2 ms each way between Redis and everything that talks to it. Direct clients then pay the round trip
on every request and every connect; a proxy pays it only on its upstream connection, as a local
sidecar in front of a remote Redis does.
"""
import argparse, csv, io, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

WORKLOADS = {
    # name: (redis-benchmark args, what it models)
    "many-clients": ("-c 256 -P 1 -t set,get -r 100000 -d 64 -n 300000", "many app connections, one request at a time"),
    "pipelined":    ("-c 16 -P 32 -t set,get -r 100000 -d 64 -n 1500000", "clients that pipeline deeply"),
    "large-values": ("-c 64 -P 1 -t set,get -r 1000 -d 16384 -n 60000", "16 KiB values"),
    "churn":        ("-c 16 -k 0 -t get -r 100000 -n 20000", "a new connection per request"),
    "clients-64":   ("-c 64 -P 1 -t set,get -r 100000 -d 64 -n 100000", "a moderate pool; for --upstream-rtt-ms runs"),
    "hot-reads":    ("-c 64 -P 1 -t get -r 10000 -d 64 -n 100000", "GETs over 10k hot keys (a cache's case)"),
}
DEFAULT_WORKLOADS = "many-clients,pipelined,large-values,churn"
REMOTE_WORKLOADS = "clients-64,churn"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}: {proc.args}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered PING on port {port}")


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_bench(port, args, timeout):
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "--csv"] + args.split()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rows = {}
    for row in csv.DictReader(io.StringIO(out.stdout)):
        try:
            rows[row["test"]] = {"rps": float(row["rps"]), "p50": float(row["p50_latency_ms"]),
                                 "p99": float(row["p99_latency_ms"])}
        except (KeyError, ValueError):
            continue
    if not rows:
        raise RuntimeError(f"redis-benchmark gave no rows: {out.stderr.strip()[:300]}")
    # one figure per workload: summed throughput, worst latency across its tests
    return {"rps": sum(r["rps"] for r in rows.values()),
            "p50": max(r["p50"] for r in rows.values()),
            "p99": max(r["p99"] for r in rows.values())}


def idle_memory(port, pid, clients):
    """Per-connection resident memory of the process behind `port` with `clients` idle connections."""
    before = rss_kib(pid)
    socks = []
    try:
        for _ in range(clients):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            socks.append(s)
        for s in socks:
            s.recv(16)
        time.sleep(1.0)
        after = rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    if before is None or after is None:
        return None
    return {"clients": clients, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_client": round((after - before) / clients, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", help="candidate command; {port} and {upstream} are filled in")
    ap.add_argument("--name", default="candidate", help="label for the candidate")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=CMD",
                    help="another candidate, e.g. a peer proxy, in the same template form; repeatable")
    ap.add_argument("--workloads", help="comma list of: " + ",".join(WORKLOADS) +
                    f" (default {DEFAULT_WORKLOADS}; with --upstream-rtt-ms {REMOTE_WORKLOADS})")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply request counts (e.g. 0.2 for a quick look)")
    ap.add_argument("--idle-clients", type=int, default=2000, help="idle connections for the memory figure; 0 skips it")
    ap.add_argument("--no-twemproxy", action="store_true")
    ap.add_argument("--upstream-rtt-ms", type=float, default=0.0, help="model a remote Redis with this round trip")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    for tool in ("redis-server", "redis-benchmark") + (() if a.no_twemproxy else ("nutcracker",)):
        if not shutil.which(tool):
            sys.exit(f"compare.py: {tool} not found (apt-get install redis-server redis-tools nutcracker)")
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass

    tmp = tempfile.mkdtemp(prefix="proxybench-")
    procs = []

    def start(name, cmd, port, **kw):
        path = os.path.join(tmp, name + ".log")
        log = open(path, "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        procs.append(p)
        try:
            wait_port(port, p)
        except RuntimeError as e:
            tail = open(path, errors="replace").read()[-1500:]
            raise SystemExit(f"compare.py: {name} did not start: {e}\n--- its output ---\n{tail}")
        return p

    try:
        rport = free_port()
        redis = start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--maxclients", "20000", "--dir", tmp], rport)
        upstream = rport
        if a.upstream_rtt_ms > 0:
            here = os.path.dirname(os.path.realpath(__file__))
            relay_dir = os.path.join(here, "delay-relay")
            relay_bin = os.path.join(relay_dir, "target", "release", "delay-relay")
            if not os.path.exists(relay_bin):
                subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path",
                                os.path.join(relay_dir, "Cargo.toml")], check=True)
            upstream = free_port()
            start("relay", [relay_bin, f"127.0.0.1:{upstream}", f"127.0.0.1:{rport}", str(a.upstream_rtt_ms / 2)],
                  upstream)
        targets = {"direct": (upstream, redis.pid)}
        if not a.no_twemproxy:
            tport, sport = free_port(), free_port()
            conf = os.path.join(tmp, "nutcracker.yml")
            with open(conf, "w") as f:
                f.write(f"bench:\n  listen: 127.0.0.1:{tport}\n  redis: true\n  hash: fnv1a_64\n"
                        f"  distribution: ketama\n  auto_eject_hosts: false\n  server_connections: 1\n"
                        f"  servers:\n   - 127.0.0.1:{upstream}:1\n")
            tw = start("twemproxy", ["nutcracker", "-c", conf, "-s", str(sport), "-a", "127.0.0.1"], tport)
            targets["twemproxy"] = (tport, tw.pid)
        candidates = ([(a.name, a.proxy)] if a.proxy else []) + [tuple(x.split("=", 1)) for x in a.also]
        for name, template in candidates:
            cport = free_port()
            cmd = template.format(port=cport, upstream=upstream, tmp=tmp)
            cand = start(name, ["sh", "-c", "exec " + cmd], cport)
            targets[name] = (cport, cand.pid)

        wl = a.workloads or (REMOTE_WORKLOADS if a.upstream_rtt_ms > 0 else DEFAULT_WORKLOADS)
        chosen = [w.strip() for w in wl.split(",") if w.strip()]
        results = {w: {t: [] for t in targets} for w in chosen}
        names = list(targets)
        for r in range(a.rounds):
            for w in chosen:
                args, _ = WORKLOADS[w]
                parts = args.split()
                i = parts.index("-n")
                parts[i + 1] = str(max(1000, int(int(parts[i + 1]) * a.scale)))
                args = " ".join(parts)
                order = names[r % len(names):] + names[:r % len(names)]
                for t in order:
                    results[w][t].append(run_bench(targets[t][0], args, timeout=600))
                print(f"round {r + 1}/{a.rounds} {w}: " + ", ".join(
                    f"{t} {results[w][t][-1]['rps']:.0f}/s" for t in names), file=sys.stderr, flush=True)

        memory = {}
        if a.idle_clients:
            for t in names:
                if t == "direct" and a.upstream_rtt_ms > 0:
                    continue  # the port is the relay's, not Redis's
                memory[t] = idle_memory(targets[t][0], targets[t][1], a.idle_clients)

        print(f"\n{'workload':14} {'target':12} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8}   ratios (median of rounds)")
        summary = {}
        for w in chosen:
            summary[w] = {}
            for t in names:
                runs = results[w][t]
                med = {k: statistics.median(x[k] for x in runs) for k in ("rps", "p50", "p99")}
                ratios = {}
                for base in names:
                    if base != t:
                        ratios[f"vs_{base}"] = round(statistics.median(
                            x["rps"] / y["rps"] for x, y in zip(runs, results[w][base])), 3)
                summary[w][t] = dict(med, **ratios)
                rtxt = " ".join(f"{k}={v:.2f}" for k, v in ratios.items()) if t != "direct" else ""
                print(f"{w:14} {t:12} {med['rps']:10.0f} {med['p50']:8.3f} {med['p99']:8.3f}   {rtxt}")
        if memory:
            print("\nidle memory (RSS growth per connection):")
            for t, m in memory.items():
                if m:
                    print(f"  {t:12} {m['kib_per_client']:8.2f} KiB/conn  ({m['clients']} conns, "
                          f"{m['rss_before_kib']} -> {m['rss_after_kib']} KiB)")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"workloads": {w: WORKLOADS[w][0] for w in chosen}, "summary": summary,
                           "rounds": results, "memory": memory}, f, indent=1)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
