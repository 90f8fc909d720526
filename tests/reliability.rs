//! Reliability under upstream faults: 48 clients check that every reply they get is the reply to
//! their own request (`tests/support/checker.rs`) while the real redis-server behind the redmux
//! binary is killed, stopped, cut off or slowed down. For each fault: no misroute, no hang, no
//! request run twice, redmux still serving, and every client succeeding again within 2 s of Redis
//! being back. Run with `--nocapture` to see the counts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::time::{Duration, Instant};

use support::{
    binary::RedmuxProcess,
    checker::{Checker, Options, Report},
    RedisServer,
};

const CLIENTS: usize = 48;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// The longest redmux may take to answer, with an error if need be: waiting for a connection,
/// then for the reply. Beyond this plus a margin, a request counts as a hang.
const REPLY_TIMEOUT: Duration = Duration::from_millis(
    CONNECT_TIMEOUT.as_millis() as u64 + REQUEST_TIMEOUT.as_millis() as u64 + 1000,
);
/// Every client must succeed again within this of Redis being back.
const RECOVERY: Duration = Duration::from_secs(2);

/// The fault tests share two cores with Redis and redmux: one at a time keeps their timings
/// meaningful.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start_redmux(redis: &RedisServer) -> RedmuxProcess {
    start_redmux_with(redis, "")
}

/// [`start_redmux`], with more sections of configuration after `[upstream]`.
fn start_redmux_with(redis: &RedisServer, more: &str) -> RedmuxProcess {
    RedmuxProcess::start(
        "",
        &format!(
            "[upstream]\naddress = \"{}\"\nconnect_timeout = \"{}ms\"\nrequest_timeout = \"{}ms\"\n{more}",
            redis.addr(),
            CONNECT_TIMEOUT.as_millis(),
            REQUEST_TIMEOUT.as_millis()
        ),
    )
}

/// Starts the checked clients and waits until every one of them has been served.
async fn start_checker(redmux: &RedmuxProcess, leavers: usize) -> Checker {
    let checker = Checker::start(
        redmux.addr,
        Options {
            clients: CLIENTS,
            reply_timeout: REPLY_TIMEOUT,
            leavers,
            mixed: true,
            attackers: 2,
        },
    );
    checker.wait_all_succeeding(support::READY_TIMEOUT).await;
    // Steady traffic first, so the fault finds a busy pipeline.
    checker.wait_ok(2_000, support::READY_TIMEOUT).await;
    checker
}

/// Every client succeeds again within [`RECOVERY`] of `back`; returns how long that took.
async fn assert_recovered(name: &str, checker: &Checker, back: Instant) -> Duration {
    match checker.all_succeeding_since(back, RECOVERY).await {
        Some(took) => took,
        None => panic!(
            "{name}: not every client succeeded within {RECOVERY:?} of Redis being back: {}",
            checker.counts()
        ),
    }
}

/// Lets every client succeed once more, stops them, and checks everything: no misroute, no
/// hang, nothing run twice (counters read directly from Redis), redmux alive and answering.
async fn finish(
    name: &str,
    checker: Checker,
    redis: &RedisServer,
    redmux: &mut RedmuxProcess,
) -> Report {
    checker.wait_all_succeeding(support::READY_TIMEOUT).await;
    let report = checker.finish().await;
    report.print(name);
    report.assert_clean(name);
    report.check_counters(name, &mut redis.direct());
    assert!(redmux.is_running(), "{name}: redmux exited");
    let mut fresh = redmux.raw().await;
    assert_eq!(fresh.call(&["PING"]).await, "+PONG\r\n", "{name}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_on_the_same_port() {
    sigkill_and_restart("sigkill", "").await;
}

/// The same with the near cache on: each client's GET follows its own SET, which the cache
/// must never answer with an older value, while the invalidation stream dies with Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_with_the_near_cache() {
    sigkill_and_restart("sigkill, cache", "[cache]\nenabled = true\n").await;
}

/// Redis killed under the checked clients and restarted on its port; `more`: configuration
/// sections after `[upstream]`.
async fn sigkill_and_restart(name: &str, more: &str) {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let mut redmux = start_redmux_with(&redis, more);
    let checker = start_checker(&redmux, 0).await;
    redis.kill();
    checker.data_lost();
    // The outage: longer than connect_timeout, so requests waiting for a connection fail too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| redis.restart());
    let took = assert_recovered(name, &checker, Instant::now()).await;
    println!("{name}: every client succeeding {took:?} after the restart");
    let report = finish(name, checker, &redis, &mut redmux).await;
    assert!(report.counts.error > 0, "the outage was felt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_beyond_the_request_timeout() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut redmux = start_redmux(&redis);
    // With clients that leave with requests in flight, stuck behind the stall.
    let checker = start_checker(&redmux, 8).await;
    redis.signal("STOP");
    // Stopped for more than twice request_timeout: requests time out, and the reconnect's
    // handshake hangs on the stopped server until connect_timeout.
    tokio::time::sleep(REQUEST_TIMEOUT * 5 / 2).await;
    redis.signal("CONT");
    let took = assert_recovered("sigstop", &checker, Instant::now()).await;
    println!("sigstop: every client succeeding {took:?} after SIGCONT");
    let report = finish("sigstop", checker, &redis, &mut redmux).await;
    assert!(report.counts.error > 0, "the stall was felt");
}

/// `CLIENT KILL` from Redis's side closes redmux's upstream connection under load, five times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_closed_by_redis() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut redmux = start_redmux(&redis);
    let checker = start_checker(&redmux, 0).await;
    let mut direct = redis.direct();
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let killed: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
            .query(&mut direct)
            .unwrap();
        // redmux's shared connection, and the pinned ones of the mixed clients.
        assert!(killed >= 1, "round {round}: redmux's upstream connections");
        let took = assert_recovered("client kill", &checker, Instant::now()).await;
        slowest = slowest.max(took);
    }
    println!("client kill: every client succeeding at most {slowest:?} after each kill");
    finish("client kill", checker, &redis, &mut redmux).await;
}

/// A Redis that stalls for less than `request_timeout` costs latency, never an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_below_the_request_timeout() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut redmux = start_redmux(&redis);
    let checker = start_checker(&redmux, 0).await;
    let mut direct = redis.direct();
    for _ in 0..4 {
        let started = Instant::now();
        let _: () = tokio::task::block_in_place(|| {
            redis::cmd("DEBUG")
                .arg(&["SLEEP", "0.3"][..])
                .query(&mut direct)
                .unwrap()
        });
        assert!(started.elapsed() >= Duration::from_millis(300));
        // Served normally between the stalls.
        checker.wait_all_succeeding(support::READY_TIMEOUT).await;
    }
    let report = finish("slow redis", checker, &redis, &mut redmux).await;
    assert_eq!(report.counts.error, 0, "no request timed out");
    assert!(
        report.counts.max_latency >= Duration::from_millis(250),
        "the stalls were felt: {:?}",
        report.counts.max_latency
    );
}

/// A runaway script (`EVAL "while true do end" 0`) wedges the shared connection it runs on;
/// the connection times out, and reconnecting meets `-BUSY`. SCRIPT KILL through redmux
/// reaches Redis at once on a connection of its own, and every client succeeds again within
/// 1 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_script_killed_through_redmux() {
    let _serial = SERIAL.lock().await;
    // Redis answers -BUSY, and accepts SCRIPT KILL, once a script has run this long.
    let redis = RedisServer::start_with(&["--busy-reply-threshold", "100"]);
    let mut redmux = start_redmux(&redis);
    let checker = start_checker(&redmux, 0).await;
    let mut runaway = redmux.raw().await;
    runaway.send("EVAL \"while true do end\" 0\r\n").await;
    // Long enough for the shared connection to time out and the reconnect to meet -BUSY.
    tokio::time::sleep(REQUEST_TIMEOUT * 2).await;
    let mut killer = redmux.raw().await;
    let asked = Instant::now();
    assert_eq!(killer.call(&["SCRIPT", "KILL"]).await, "+OK\r\n");
    let killed = Instant::now();
    println!(
        "runaway script: SCRIPT KILL answered in {:?}",
        killed - asked
    );
    assert!(
        killed - asked < REQUEST_TIMEOUT,
        "SCRIPT KILL waited behind the script"
    );
    assert_eq!(
        runaway.reply_str().await,
        "-ERR redmux: upstream request timed out\r\n",
        "the script ran past request_timeout"
    );
    let took = match checker
        .all_succeeding_since(killed, Duration::from_secs(1))
        .await
    {
        Some(took) => took,
        None => panic!(
            "runaway script: not every client succeeded within 1 s of the kill: {}",
            checker.counts()
        ),
    };
    println!("runaway script: every client succeeding {took:?} after the kill");
    let report = finish("runaway script", checker, &redis, &mut redmux).await;
    assert!(report.counts.error > 0, "the script was felt");
}

/// Mixed traffic with a fault every few seconds against the redmux binary, for 60 s or
/// `REDMUX_SOAK_SECS`: the counts stay consistent and redmux's memory stays flat.
/// Run with `cargo test --test reliability -- --ignored soak --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with --ignored soak"]
async fn soak() {
    let _serial = SERIAL.lock().await;
    let secs: u64 = std::env::var("REDMUX_SOAK_SECS")
        .ok()
        .map(|s| s.parse().expect("REDMUX_SOAK_SECS is a number of seconds"))
        .unwrap_or(60);
    let deadline = Instant::now() + Duration::from_secs(secs);
    // A cycle (quiet time, fault, recovery) takes up to about 5 s: none starts that cannot end
    // by the deadline.
    let cycle_length = Duration::from_secs(5);
    let mut redis = RedisServer::start();
    let mut redmux = start_redmux(&redis);
    let checker = start_checker(&redmux, 8).await;
    let mut warm_rss = None;
    let mut cycle = 0;
    while Instant::now() + cycle_length < deadline {
        // Traffic without a fault for a while: a pause that models quiet time between faults.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let name = ["client kill", "slow redis", "sigstop", "sigkill"][cycle % 4];
        match cycle % 4 {
            0 => {
                let _: i64 = redis::cmd("CLIENT")
                    .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
                    .query(&mut redis.direct())
                    .unwrap();
            }
            1 => tokio::task::block_in_place(|| {
                redis::cmd("DEBUG")
                    .arg(&["SLEEP", "0.3"][..])
                    .query::<()>(&mut redis.direct())
                    .unwrap()
            }),
            2 => {
                redis.signal("STOP");
                // The stall being modelled: longer than request_timeout.
                tokio::time::sleep(REQUEST_TIMEOUT * 2).await;
                redis.signal("CONT");
            }
            _ => {
                redis.kill();
                checker.data_lost();
                // The outage being modelled.
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::block_in_place(|| redis.restart());
            }
        }
        let took = assert_recovered(name, &checker, Instant::now()).await;
        cycle += 1;
        let rss = redmux.rss_kib();
        println!(
            "soak: cycle {cycle} ({name}): recovered in {took:?}; rss {rss} KiB; {}",
            checker.counts()
        );
        // Warm-up is one round of every fault: buffers and allocator pools have grown to
        // their working size by then.
        if cycle == 4 {
            warm_rss = Some(rss);
        }
    }
    let report = finish("soak", checker, &redis, &mut redmux).await;
    let end_rss = redmux.rss_kib();
    println!(
        "soak: {cycle} faults in {secs} s; rss after warm-up {warm_rss:?} KiB, at the end \
         {end_rss} KiB, peak {} KiB; leavers sent {} INCRs",
        redmux.peak_rss_kib(),
        report.leavers.iter().map(|(_, n)| n).sum::<u64>()
    );
    if let Some(warm) = warm_rss {
        let slack = (warm / 10).max(2048);
        assert!(
            end_rss <= warm + slack,
            "redmux's memory grew from {warm} KiB after warm-up to {end_rss} KiB"
        );
    }
}
