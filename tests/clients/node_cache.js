// node-redis 5's client-side cache (CLIENT TRACKING in RESP3) reading through redmux while
// another client writes to Redis directly. Prints one JSON line; tests/client_caches.rs judges
// it. Usage: node node_cache.js LIBS READER_URL WRITER_URL ROUNDS, where LIBS holds
// node_modules/redis.
const [libs, readerUrl, writerUrl, roundsArg] = process.argv.slice(2);
const { createClient, BasicClientSideCache } = require(require.resolve('redis', { paths: [libs] }));

async function main() {const rounds = Number(roundsArg);
const cache = new BasicClientSideCache({ ttl: 0, maxEntries: 0 });
const reader = createClient({ url: readerUrl, RESP: 3, clientSideCache: cache });
const writer = createClient({ url: writerUrl });
const errors = [];
reader.on('error', (e) => errors.push(String(e)));
writer.on('error', (e) => errors.push(String(e)));
await reader.connect();
await writer.connect();
const now = () => performance.now();
const tick = () => new Promise((resolve) => setImmediate(resolve));

// Staleness: after each acknowledged write, reads of the key. A read older than the last
// write acknowledged before it began is stale by the time since the first newer write was
// acknowledged.
const acked = [];
let stale = 0;
let maxLag = 0;
let reads = 0;
await writer.set('csc:k', '0');
acked[0] = now();
for (let i = 1; i <= rounds; i++) {
  await writer.set('csc:k', String(i));
  acked[i] = now();
  for (let j = 0; j < 3; j++) {
    const began = now();
    const value = Number(await reader.get('csc:k'));
    reads++;
    if (value < i) {
      stale++;
      maxLag = Math.max(maxLag, began - acked[value + 1]);
    }
    await tick();
  }
}

// Invalidation delay: from a write's acknowledgement until a cached read returns it.
const delays = [];
for (let i = 1; i <= rounds; i++) {
  await reader.get('csc:d');
  await writer.set('csc:d', String(i));
  const t0 = now();
  while (Number(await reader.get('csc:d')) !== i) {
    await tick();
    if (now() - t0 > 5000) break;
  }
  delays.push(now() - t0);
}
delays.sort((a, b) => a - b);
const pct = (p) => delays[Math.min(delays.length - 1, Math.floor(delays.length * p))];
const stats = cache.stats();
console.log(JSON.stringify({
  reads,
  hits: stats.hitCount,
  stale,
  max_lag_ms: maxLag,
  delay_p50_ms: pct(0.5),
  delay_p99_ms: pct(0.99),
  delay_max_ms: delays[delays.length - 1],
  errors,
}));
await reader.quit();
await writer.quit();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
