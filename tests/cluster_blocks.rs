//! The Redis Cluster building blocks (`redmux::cluster`) checked against a live Redis 7.0.

mod support;

use std::collections::BTreeSet;

use redmux::cluster::keys::{key_positions, Scope};
use support::{
    cluster::{parse, Conn, Resp},
    RedisServer,
};

/// Requests whose keys Redis finds by keyword or count, with several keys, and the edges of
/// those rules; each is also checked with `COMMAND GETKEYS`.
const MOVABLE: &[&[&str]] = &[
    &["EVAL", "s", "3", "a", "b", "c", "x", "y"],
    &["EVAL", "s", "0", "x"],
    &["EVAL", "s", "4", "a", "b"],
    &["EVAL", "s", "-1", "a"],
    &["EVAL", "s", "2abc", "a", "b"],
    &["EVAL", "s", "02", "a", "b"],
    &["EVAL", "s", "4294967297", "a", "b"],
    &["EVAL", "s", "2147483648", "a", "b"],
    &["evalsha", "s", "2", "a", "b"],
    &["EVAL_RO", "s", "1", "a", "x"],
    &["EVALSHA_RO", "s", "2", "a", "b"],
    &["FCALL", "f", "2", "a", "b", "x"],
    &["FCALL_RO", "f", "1", "a"],
    &[
        "ZUNIONSTORE",
        "d",
        "3",
        "a",
        "b",
        "c",
        "WEIGHTS",
        "1",
        "2",
        "3",
    ],
    &["ZUNIONSTORE", "d", "0", "a"],
    &["ZINTERSTORE", "d", "2", "a", "b", "AGGREGATE", "MAX"],
    &["ZINTERSTORE", "d", " 2", "a", "b"],
    &["ZDIFFSTORE", "d", "2", "a", "b"],
    &["ZUNION", "2", "a", "b", "WITHSCORES"],
    &["ZINTER", "3", "a", "b", "c"],
    &["ZDIFF", "2", "a", "b"],
    &["ZINTERCARD", "2", "a", "b", "LIMIT", "3"],
    &["SINTERCARD", "3", "a", "b", "c"],
    &["SINTERCARD", "+3", "a", "b", "c"],
    &["LMPOP", "2", "a", "b", "LEFT", "COUNT", "2"],
    &["ZMPOP", "1", "a", "MIN"],
    &["BLMPOP", "0", "2", "a", "b", "RIGHT"],
    &["BZMPOP", "1.5", "3", "a", "b", "c", "MAX", "COUNT", "1"],
    &[
        "XREAD", "COUNT", "1", "BLOCK", "0", "STREAMS", "a", "b", "0", "0",
    ],
    &["XREAD", "STREAMS", "a", "b", "c", "0", "0", "0"],
    &["XREAD", "STREAMS", "a", "b", "0"],
    &["XREAD", "streams", "streams", "0"],
    &["XREAD", "COUNT", "1", "a", "0"],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c",
        "STREAMS",
        "a",
        "b",
        "0",
        "0",
    ],
    &["XREADGROUP", "GROUP", "g", "streams", "STREAMS", "a", ">"],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c",
        "NOACK",
        "STREAMS",
        "a",
        "b",
        ">",
    ],
    &["XREADGROUP", "GROUP", "g", "c", "COUNT", "STREAMS", "a"],
    &["MIGRATE", "h", "1", "k", "0", "5000"],
    &["MIGRATE", "h", "1", "k", "0", "5000", "COPY", "REPLACE"],
    &["MIGRATE", "h", "1", "", "0", "5000", "KEYS", "a", "b", "c"],
    &[
        "MIGRATE", "h", "1", "", "0", "5000", "COPY", "AUTH", "keys", "KEYS", "a",
    ],
    &[
        "MIGRATE", "h", "1", "", "0", "5000", "AUTH2", "u", "keys", "KEYS", "a", "b",
    ],
    &["MIGRATE", "h", "1", "k", "0", "5000", "KEYS", "a"],
    &["MIGRATE", "h", "1", "", "0", "5000", "KEYS"],
    &["MIGRATE", "h", "1", "", "0", "5000", "REPLACE", "KEYS", "a"],
    &["SORT", "k"],
    &["SORT", "k", "STORE", "d"],
    &[
        "SORT", "k", "BY", "w_*", "GET", "#", "LIMIT", "0", "10", "STORE", "d",
    ],
    &["SORT", "k", "BY", "store", "STORE", "d"],
    &["SORT", "k", "STORE", "a", "STORE", "b"],
    &["SORT", "k", "LIMIT", "store", "x", "ALPHA"],
    &["SORT", "k", "STORE"],
    &["SORT_RO", "k", "BY", "w_*", "GET", "#"],
    &["GEORADIUS", "k", "0", "0", "1", "km"],
    &["GEORADIUS", "k", "0", "0", "1", "km", "STORE", "d"],
    &["GEORADIUS", "k", "0", "0", "1", "km", "STOREDIST", "d"],
    &[
        "GEORADIUS",
        "k",
        "0",
        "0",
        "1",
        "km",
        "STORE",
        "a",
        "STOREDIST",
        "b",
    ],
    &[
        "GEORADIUS",
        "k",
        "0",
        "0",
        "1",
        "km",
        "STOREDIST",
        "b",
        "STORE",
        "a",
    ],
    &["GEORADIUS", "k", "0", "0", "1", "km", "COUNT", "1", "STORE"],
    &["GEORADIUSBYMEMBER", "k", "m", "1", "km", "STORE", "d"],
    &[
        "GEORADIUSBYMEMBER",
        "k",
        "m",
        "1",
        "km",
        "WITHDIST",
        "storedist",
        "d",
    ],
    &["GEORADIUS_RO", "k", "0", "0", "1", "km", "STORE", "d"],
    &["SET", "k", "v", "GET"],
    &["BITFIELD", "k", "GET", "u8", "0"],
    &["OBJECT", "ENCODING", "k"],
    &["object", "freq", "k"],
    &["MEMORY", "USAGE", "k", "SAMPLES", "5"],
    &["XINFO", "STREAM", "k", "FULL", "COUNT", "5"],
    &["XINFO", "GROUPS", "k"],
    &["XINFO", "CONSUMERS", "k", "g"],
    &["XGROUP", "CREATE", "k", "g", "$", "MKSTREAM"],
    &["XGROUP", "SETID", "k", "g", "0"],
    &["XGROUP", "DESTROY", "k", "g"],
    &["XGROUP", "CREATECONSUMER", "k", "g", "c"],
    &["XGROUP", "DELCONSUMER", "k", "g", "c"],
    &["MSET", "a", "1", "b", "2", "c", "3"],
    &["MSET", "a", "1", "b"],
    &["MSETNX", "a", "1", "b", "2"],
    &["BITOP", "AND", "d", "a", "b", "c"],
    &["PFMERGE", "d"],
    &["PFMERGE", "d", "a", "b"],
    &["SDIFFSTORE", "d", "a", "b"],
    &["BLPOP", "a", "b", "c", "0"],
    &["LCS", "a", "b"],
    &["GeT", "k"],
];

/// Sharded pub/sub commands: `COMMAND GETKEYS` says they have no key arguments (their specs
/// are flagged `not_key`), yet a cluster routes them by the channel's slot, so redmux reports
/// their channels under `Scope::ShardChannels`. Skipped in the comparison.
const SHARD_CHANNELS: &[&str] = &["spublish", "ssubscribe", "sunsubscribe"];

/// Every command `COMMAND` reports, with its subcommands, as (name words, arity, has keys).
fn commands(conn: &mut Conn) -> Vec<(Vec<String>, i64, bool)> {
    fn walk(entry: &Resp, out: &mut Vec<(Vec<String>, i64, bool)>) {
        let fields = entry.items();
        let name = fields[0].text();
        let flags: Vec<String> = fields[2].items().iter().map(Resp::text).collect();
        let keyed_spec = fields[8].items().iter().any(|spec| {
            let spec = spec.items();
            let flags = spec
                .chunks(2)
                .find(|kv| kv[0].text() == "flags")
                .map(|kv| kv[1].items().iter().map(Resp::text).collect::<Vec<_>>())
                .unwrap_or_default();
            !flags.iter().any(|f| f == "not_key")
        });
        let keyed = keyed_spec || flags.iter().any(|f| f == "movablekeys");
        let subcommands = fields[9].items();
        if subcommands.is_empty() {
            let words = name.split('|').map(str::to_string).collect();
            out.push((words, fields[1].int(), keyed));
        }
        for sub in subcommands {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    for entry in conn.query(&["COMMAND", "INFO"]).items() {
        walk(entry, &mut out);
    }
    out
}

/// Requests for one command built from its arity alone: the fixed positions of most commands,
/// with fillers that are distinct small numbers, so a count argument parses and points at
/// keys that can be told apart.
fn generic_samples(words: &[String], arity: i64) -> Vec<Vec<String>> {
    let counts: Vec<usize> = match arity >= 0 {
        true => vec![arity as usize],
        false => (0..6).map(|more| (-arity) as usize + more).collect(),
    };
    let mut samples = Vec::new();
    for count in counts {
        let count = count.max(words.len());
        let mut numbers = words.to_vec();
        let mut names = words.to_vec();
        for at in words.len()..count {
            numbers.push(at.to_string());
            names.push(format!("k{at}"));
        }
        samples.push(numbers);
        samples.push(names);
    }
    // One argument too few: Redis refuses it before looking for keys.
    if words.len() < samples[0].len() {
        let mut short = samples[1].clone();
        short.pop();
        samples.push(short);
    }
    samples
}

/// For every command Redis reports, redmux's key extraction (`cluster::keys`) finds the keys
/// `COMMAND GETKEYS` finds, in the same order, for requests built from the command's arity and
/// for the movable forms above; where GETKEYS refuses (no keys, invalid arguments, wrong
/// count), redmux finds none. Every command with keys must have had at least one request
/// with keys.
fn check_key_extraction(port: u16) {
    let mut conn = Conn::connect(port);
    let commands = commands(&mut conn);
    assert!(
        commands.len() > 300,
        "COMMAND INFO lists {}",
        commands.len()
    );
    let mut samples: Vec<Vec<String>> = Vec::new();
    for (words, arity, _) in &commands {
        if SHARD_CHANNELS.contains(&words[0].as_str()) {
            continue;
        }
        samples.extend(generic_samples(words, *arity));
    }
    samples.extend(
        MOVABLE
            .iter()
            .map(|args| args.iter().map(|a| a.to_string()).collect()),
    );
    let requests: Vec<Vec<&[u8]>> = samples
        .iter()
        .map(|args| {
            let mut request: Vec<&[u8]> = vec![b"COMMAND", b"GETKEYS"];
            request.extend(args.iter().map(|a| a.as_bytes()));
            request
        })
        .collect();
    let replies = conn.pipeline(&requests);
    let mut mismatches = Vec::new();
    let mut with_keys = BTreeSet::new();
    for (args, reply) in samples.iter().zip(replies) {
        let expected: Vec<String> = match parse(&reply) {
            Resp::Array(keys) => keys.iter().map(Resp::text).collect(),
            Resp::Error(_) => Vec::new(),
            other => panic!("GETKEYS {args:?}: {other:?}"),
        };
        let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let (scope, positions) = key_positions(&argv);
        let found: Vec<String> = positions.iter().map(|&at| args[at].clone()).collect();
        if found != expected {
            mismatches.push(format!("{args:?}: redmux {found:?}, Redis {expected:?}"));
        }
        assert_eq!(
            scope == Scope::Keys,
            !found.is_empty(),
            "{args:?}: scope {scope:?}"
        );
        if !expected.is_empty() {
            let name = match commands
                .iter()
                .any(|(words, _, _)| words.len() == 2 && words[0] == args[0].to_lowercase())
            {
                true => format!("{}|{}", args[0], args[1]).to_lowercase(),
                false => args[0].to_lowercase(),
            };
            with_keys.insert(name);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} requests differ:\n{}",
        mismatches.len(),
        samples.len(),
        mismatches.join("\n")
    );
    let keyed: BTreeSet<String> = commands
        .iter()
        .filter(|(words, _, keyed)| *keyed && !SHARD_CHANNELS.contains(&words[0].as_str()))
        .map(|(words, _, _)| words.join("|"))
        .collect();
    let untested: Vec<&String> = keyed.difference(&with_keys).collect();
    assert!(untested.is_empty(), "no request had keys for {untested:?}");
}

#[test]
fn key_extraction_matches_command_getkeys() {
    let server = RedisServer::start();
    check_key_extraction(server.port);
}
