"""redis-py's client-side cache (CLIENT TRACKING in RESP3) reading through redmux while another
client writes to Redis directly. Prints one JSON line; tests/client_caches.rs judges it.
Usage: python3 py_cache.py LIBS READER_PORT WRITER_PORT ROUNDS, where LIBS holds the redis
package."""

import json
import sys
import time

libs, reader_port, writer_port, rounds = sys.argv[1:5]
sys.path.insert(0, libs)
import redis  # noqa: E402
from redis.cache import CacheConfig  # noqa: E402
from redis.connection import CacheProxyConnection  # noqa: E402

# redis-py enables its cache only for Redis 7.4 or later, by the version HELLO reports (a
# policy of the library: CLIENT TRACKING is Redis 6's). The tests run Debian's Redis 7.0.
CacheProxyConnection.MIN_ALLOWED_VERSION = "7.0.0"

rounds = int(rounds)
reader = redis.Redis(
    host="127.0.0.1", port=int(reader_port), protocol=3, cache_config=CacheConfig()
)
writer = redis.Redis(host="127.0.0.1", port=int(writer_port))
now = time.perf_counter

# Staleness: after each acknowledged write, reads of the key. A read older than the last write
# acknowledged before it began is stale by the time since the first newer write was
# acknowledged.
def gets():
    """GETs Redis has run: the reader's that its cache did not answer."""
    stats = writer.info("commandstats").get("cmdstat_get", {})
    return stats.get("calls", 0)


gets_before = gets()
acked = {}
stale = 0
max_lag = 0.0
reads = 0
writer.set("csc:k", "0")
acked[0] = now()
for i in range(1, rounds + 1):
    writer.set("csc:k", str(i))
    acked[i] = now()
    for _ in range(3):
        began = now()
        value = int(reader.get("csc:k"))
        reads += 1
        if value < i:
            stale += 1
            max_lag = max(max_lag, began - acked[value + 1])

hits = reads - (gets() - gets_before)

# Invalidation delay: from a write's acknowledgement until a cached read returns it.
delays = []
for i in range(1, rounds + 1):
    reader.get("csc:d")
    writer.set("csc:d", str(i))
    t0 = now()
    while int(reader.get("csc:d")) != i and now() - t0 < 5:
        pass
    delays.append(now() - t0)
delays.sort()


def pct(p):
    return delays[min(len(delays) - 1, int(len(delays) * p))] * 1000


print(
    json.dumps(
        {
            "reads": reads,
            "hits": hits,
            "stale": stale,
            "max_lag_ms": max_lag * 1000,
            "delay_p50_ms": pct(0.5),
            "delay_p99_ms": pct(0.99),
            "delay_max_ms": delays[-1] * 1000,
            "errors": [],
        }
    )
)
