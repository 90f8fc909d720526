#!/usr/bin/env python3
"""Scaling and CPU-per-request: direct Redis, twemproxy and redmux, many-clients workload at
several client counts. Prints ops/s, p50/p99 and the CPU time each process used per request."""
import os, subprocess, sys, time, socket, tempfile, csv, io, resource

BIN = sys.argv[1]
COUNTS = [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "16,256,2048,8192").split(",")]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port)).close(); return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")

def ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

tmp = tempfile.mkdtemp()
rp, tp, mp = free_port(), free_port(), free_port()
procs = []
def start(cmd, port):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p); wait(port); return p
try:
    redis = start(["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--maxclients", "20000", "--dir", tmp], rp)
    conf = os.path.join(tmp, "tw.yml")
    open(conf, "w").write(f"b:\n  listen: 127.0.0.1:{tp}\n  redis: true\n  hash: fnv1a_64\n  distribution: ketama\n"
                          f"  auto_eject_hosts: false\n  server_connections: 1\n  servers:\n   - 127.0.0.1:{rp}:1\n")
    tw = start(["nutcracker", "-c", conf, "-s", str(free_port()), "-a", "127.0.0.1"], tp)
    rm = start([BIN, "--listen", f"127.0.0.1:{mp}", "--upstream", f"127.0.0.1:{rp}"], mp)
    targets = {"direct": (rp, None), "twemproxy": (tp, tw.pid), "redmux": (mp, rm.pid)}
    hz = os.sysconf("SC_CLK_TCK")
    results = {}
    for r in range(ROUNDS):
        for c in COUNTS:
            n = max(100000, c * 40)
            order = list(targets)[r % 3:] + list(targets)[:r % 3]
            for name in order:
                port, pid = targets[name]
                t0 = {k: ticks(v) for k, v in (("redis", redis.pid), ("proxy", pid)) if v}
                out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(c), "-P", "1", "-t", "set,get",
                                      "-r", "100000", "-d", "64", "-n", str(n), "--csv"],
                                     capture_output=True, text=True).stdout
                t1 = {k: ticks(v) for k, v in (("redis", redis.pid), ("proxy", pid)) if v}
                rows = list(csv.DictReader(io.StringIO(out)))
                rps = sum(float(x["rps"]) for x in rows)
                p50 = max(float(x["p50_latency_ms"]) for x in rows)
                p99 = max(float(x["p99_latency_ms"]) for x in rows)
                reqs = 2 * n
                cpu = {k: (t1[k] - t0[k]) / hz / reqs * 1e6 for k in t0}
                results.setdefault((c, name), []).append((rps, p50, p99, cpu.get("proxy", 0), cpu["redis"]))
                print(f"round {r+1} c={c} {name}: {rps:.0f} ops/s p50 {p50} p99 {p99} "
                      f"proxy {cpu.get('proxy', 0):.1f} us/req redis {cpu['redis']:.1f} us/req", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print("\n| clients | target | ops/s | vs direct | p50 ms | p99 ms | proxy CPU us/req | redis CPU us/req |")
    print("|---|---|---|---|---|---|---|---|")
    for c in COUNTS:
        d = [x[0] for x in results[(c, "direct")]]
        for name in targets:
            xs = results[(c, name)]
            ratios = [x[0] / y for x, y in zip(xs, d)]
            print(f"| {c} | {name} | {med([x[0] for x in xs]):.0f} | {med(ratios):.2f} | {med([x[1] for x in xs])} | "
                  f"{med([x[2] for x in xs])} | {med([x[3] for x in xs]):.1f} | {med([x[4] for x in xs]):.1f} |")
finally:
    for p in procs:
        p.terminate()
