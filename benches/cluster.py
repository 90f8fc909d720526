#!/usr/bin/env python3
"""redmux in front of a Redis Cluster against predixy's cluster mode.

Starts three redis-server masters in cluster mode on free loopback ports and joins them with
`redis-cli --cluster create` (no replicas: only the masters serve), then starts redmux
(`--upstream-cluster`) and predixy (a `ClusterServerPool` listing the three masters) in front of
it, and runs compare.py's redis-benchmark workloads through both, in rotating order, several
rounds. Prints medians and the per-round ratio redmux/predixy (the figure to quote: absolute
numbers drift with machine load), and each proxy's CPU time per request (its user + system time
over the run, from /proc: steadier than throughput on a shared machine). compare.py knows only a standalone Redis; this is its cluster
counterpart.

  cargo build --release
  benches/cluster.py --predixy PATH/TO/predixy-binary [--threads 1] [--rounds 3] [--cpu-quota 0.3]

--predixy names predixy's own binary (it is given a config file as its only argument).
--cpu-quota F caps each proxy at F of one CPU (a cgroup of its own, v1 or v2 cpu controller;
needs root). Without it, on a small machine redis-benchmark and Redis share the cores with the
proxy and the load generator sets the pace; with it, the proxy does, and throughput follows its
CPU cost per request, as on a machine where the proxy is the bottleneck.
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import WORKLOADS, DEFAULT_WORKLOADS, free_port, wait_port, run_bench  # noqa: E402

MASTERS = 3


def start_cluster(tmp):
    procs, ports = [], []
    for _ in range(MASTERS):
        port, bus = free_port(), free_port()
        d = os.path.join(tmp, f"node-{port}")
        os.makedirs(d)
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--cluster-enabled", "yes",
             "--cluster-port", str(bus), "--cluster-config-file", os.path.join(d, "nodes.conf"),
             "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--dir", d],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ports.append(port)
    for port, proc in zip(ports, procs):
        wait_port(port, proc)
    subprocess.run(["redis-cli", "--cluster", "create"] + [f"127.0.0.1:{p}" for p in ports]
                   + ["--cluster-replicas", "0", "--cluster-yes"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        infos = [subprocess.run(["redis-cli", "-p", str(p), "CLUSTER", "INFO"], capture_output=True,
                                text=True).stdout for p in ports]
        if all("cluster_state:ok" in i for i in infos):
            return procs, ports
        time.sleep(0.2)
    raise RuntimeError("the cluster did not reach cluster_state:ok")


def predixy_config(tmp, port, ports, threads):
    path = os.path.join(tmp, f"predixy-{port}.conf")
    servers = "\n".join(f"        + 127.0.0.1:{p}" for p in ports)
    with open(path, "w") as f:
        f.write(f"""Bind 127.0.0.1:{port}
WorkerThreads {threads}
ClientTimeout 0
Log {tmp}/predixy-{port}.log
LogVerbSample 0
LogDebugSample 0
LogInfoSample 0
LogNoticeSample 0
LogWarnSample 1
LogErrorSample 1
ClusterServerPool {{
    RefreshInterval 30
    Servers {{
{servers}
    }}
}}
""")
    return path


def cpu_seconds(pid):
    """User and system CPU time of process `pid` so far (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class CpuCap:
    """A cgroup capping its processes at `quota` of one CPU, removed by close()."""

    def __init__(self, name, quota):
        period = 100_000
        v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        self.path = os.path.join("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/cpu",
                                 f"redmux-bench-{name}-{os.getpid()}")
        os.makedirs(self.path)
        if v2:
            self.write("cpu.max", f"{int(quota * period)} {period}")
        else:
            self.write("cpu.cfs_period_us", str(period))
            self.write("cpu.cfs_quota_us", str(int(quota * period)))

    def write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def add(self, pid):
        self.write("cgroup.procs", str(pid))

    def close(self):
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predixy", required=True, help="predixy's binary")
    p.add_argument("--redmux", default="target/release/redmux")
    p.add_argument("--threads", type=int, default=1, help="threads for each proxy")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every workload's -n")
    p.add_argument("--cpu-quota", type=float, help="cap each proxy at this share of one CPU")
    a = p.parse_args()
    for tool in ("redis-server", "redis-cli", "redis-benchmark"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed")
    tmp = tempfile.mkdtemp(prefix="redmux-cluster-bench-")
    procs, caps = [], []
    try:
        cluster, ports = start_cluster(tmp)
        procs += cluster
        seeds = ",".join(f"127.0.0.1:{p}" for p in ports)
        targets, pids = {}, {}
        rport = free_port()
        redmux = subprocess.Popen([a.redmux, "--listen", f"127.0.0.1:{rport}", "--upstream-cluster", seeds,
                                   "--threads", str(a.threads), "--log-level", "warn"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redmux)
        wait_port(rport, redmux)
        targets["redmux"] = rport
        pids["redmux"] = redmux.pid
        pport = free_port()
        predixy = subprocess.Popen([a.predixy, predixy_config(tmp, pport, ports, a.threads)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(predixy)
        wait_port(pport, predixy)
        targets["predixy"] = pport
        pids["predixy"] = predixy.pid
        if a.cpu_quota:
            for n, pid in pids.items():
                caps.append(CpuCap(n, a.cpu_quota))
                caps[-1].add(pid)
        names = list(targets)
        results = {w: {n: [] for n in names} for w in a.workloads.split(",")}
        for r in range(a.rounds):
            for w in results:
                args, _ = WORKLOADS[w]
                if a.scale != 1.0:
                    parts = args.split()
                    i = parts.index("-n")
                    parts[i + 1] = str(max(1000, int(int(parts[i + 1]) * a.scale)))
                    args = " ".join(parts)
                order = names[r % len(names):] + names[:r % len(names)]
                parts = args.split()
                tests = len(parts[parts.index("-t") + 1].split(","))
                requests = int(parts[parts.index("-n") + 1]) * tests
                for n in order:
                    before = cpu_seconds(pids[n])
                    result = run_bench(targets[n], args, timeout=600)
                    after = cpu_seconds(pids[n])
                    result["user_us"], result["sys_us"] = (
                        (a - b) * 1e6 / requests for a, b in zip(after, before))
                    result["cpu_us"] = result["user_us"] + result["sys_us"]
                    results[w][n].append(result)
        print(f"{'workload':14} {'redmux rps':>12} {'predixy rps':>12} {'ratio':>7}  "
              f"{'CPU µs/req redmux':>18} {'predixy':>8}  {'user+sys redmux':>16} {'predixy':>11}  "
              "per-round ratios")
        for w, by in results.items():
            ratios = [x["rps"] / y["rps"] for x, y in zip(by["redmux"], by["predixy"])]
            cpu = {n: statistics.median(x["cpu_us"] for x in by[n]) for n in names}
            split = {n: "{:.2f}+{:.2f}".format(*(statistics.median(x[k] for x in by[n])
                                                 for k in ("user_us", "sys_us"))) for n in names}
            print(f"{w:14} {statistics.median(x['rps'] for x in by['redmux']):12.0f} "
                  f"{statistics.median(x['rps'] for x in by['predixy']):12.0f} "
                  f"{statistics.median(ratios):7.2f}  {cpu['redmux']:18.2f} {cpu['predixy']:8.2f}  "
                  f"{split['redmux']:>16} {split['predixy']:>11}  "
                  f"{' '.join(f'{x:.2f}' for x in ratios)}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for cap in caps:
            cap.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
