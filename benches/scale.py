#!/usr/bin/env python3
"""Scaling and CPU-per-request: direct Redis, twemproxy and redmux at several client counts.
Prints ops/s, p50/p99 and the CPU time each process used per request: redis-benchmark, the
proxy and Redis. On a machine whose cores are all busy, throughput follows the sum of the three.

  [REQUESTS=N] [SETSID=1] benches/scale.py BIN [COUNTS [ROUNDS [BENCH_ARGS]]]
      N: requests per test; default max(100000, 40 per client).
      SETSID=1: start Redis and the proxies in sessions of their own, as compare.py does. With the
      kernel's autogroup scheduling each session then competes as a group of its own.
  benches/scale.py target/release/redmux 16,256,2048,8192 3                 # many-clients
  benches/scale.py target/release/redmux 16 3 "-P 32 -t set,get -r 100000 -d 64"   # pipelined
"""
import os, subprocess, sys, time, socket, tempfile, csv, io, resource

BIN = sys.argv[1]
COUNTS = [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "16,256,2048,8192").split(",")]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
BENCH = (sys.argv[4] if len(sys.argv) > 4 else "-P 1 -t set,get -r 100000 -d 64").split()
TESTS = len(BENCH[BENCH.index("-t") + 1].split(","))
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
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=os.environ.get("SETSID") == "1")
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
            n = int(os.environ.get("REQUESTS", 0)) or max(100000, c * 40)
            order = list(targets)[r % 3:] + list(targets)[:r % 3]
            for name in order:
                port, pid = targets[name]
                t0 = {k: ticks(v) for k, v in (("redis", redis.pid), ("proxy", pid)) if v}
                b0 = os.times()
                out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(c), "-n", str(n), "--csv"] + BENCH,
                                     capture_output=True, text=True).stdout
                b1 = os.times()
                t1 = {k: ticks(v) for k, v in (("redis", redis.pid), ("proxy", pid)) if v}
                rows = list(csv.DictReader(io.StringIO(out)))
                rps = sum(float(x["rps"]) for x in rows)
                p50 = max(float(x["p50_latency_ms"]) for x in rows)
                p99 = max(float(x["p99_latency_ms"]) for x in rows)
                reqs = TESTS * n
                cpu = {k: (t1[k] - t0[k]) / hz / reqs * 1e6 for k in t0}
                bench = ((b1.children_user - b0.children_user) + (b1.children_system - b0.children_system)) / reqs * 1e6
                total = bench + cpu.get("proxy", 0) + cpu["redis"]
                results.setdefault((c, name), []).append((rps, p50, p99, bench, cpu.get("proxy", 0), cpu["redis"], total))
                print(f"round {r+1} c={c} {name}: {rps:.0f} ops/s p50 {p50} p99 {p99} bench {bench:.1f} "
                      f"proxy {cpu.get('proxy', 0):.1f} redis {cpu['redis']:.1f} total {total:.1f} us/req", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"\nredis-benchmark {' '.join(BENCH)}; CPU in us per request")
    print("\n| clients | target | ops/s | vs direct | p50 ms | p99 ms | bench CPU | proxy CPU | redis CPU | total CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in COUNTS:
        d = [x[0] for x in results[(c, "direct")]]
        for name in targets:
            xs = results[(c, name)]
            ratios = [x[0] / y for x, y in zip(xs, d)]
            print(f"| {c} | {name} | {med([x[0] for x in xs]):.0f} | {med(ratios):.2f} | {med([x[1] for x in xs])} | "
                  f"{med([x[2] for x in xs])} | " + " | ".join(f"{med([x[i] for x in xs]):.1f}" for i in (3, 4, 5, 6)) + " |")
finally:
    for p in procs:
        p.terminate()
