//! A real Redis Cluster for tests: three masters with a replica each, on free loopback ports,
//! killed on drop; a blocking RESP2 connection that hands back each reply's raw bytes (the
//! building blocks under test parse those bytes themselves), and a small decoder for the
//! test's own reading of them.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use redmux::resp::{encode_command, ReplyScanner};

use super::{answers_ping, free_port, tls::Certs, Deadline};

/// Masters, and replicas of each, in the cluster [`Cluster::start`] creates.
pub(crate) const MASTERS: usize = 3;
pub(crate) const NODES: usize = MASTERS * 2;

/// One redis-server of the cluster.
struct Node {
    port: u16,
    /// Its TLS port, in a cluster started by [`Cluster::start_tls`].
    tls_port: Option<u16>,
    /// `None` once killed.
    child: Option<Child>,
}

/// What every node of a cluster is started with besides the defaults.
#[derive(Default)]
struct Options<'a> {
    /// TLS on a port of its own (the plaintext port stays open, for the test's own
    /// connections and redis-cli), on the cluster bus and for replication.
    tls: Option<&'a Certs>,
    extra: &'a [&'a str],
}

/// Six redis-server processes in cluster mode, joined by `redis-cli --cluster create` into
/// three masters with one replica each. Every process is killed on drop.
pub(crate) struct Cluster {
    nodes: Vec<Node>,
    /// Holds each node's directory (its `nodes.conf`, and the RDB a replica loads): one each,
    /// so replicas never write over each other's `dump.rdb`.
    _dir: tempfile::TempDir,
}

/// A node stopped by [`Cluster::stop`]; dropping it lets the node go on.
pub(crate) struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        super::send_signal(self.0, "CONT");
    }
}

impl Cluster {
    /// Starts the nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok` with all 16384 slots served.
    pub(crate) fn start() -> Cluster {
        Self::start_with(&Options::default())
    }

    /// [`Cluster::start`], each node also speaking TLS with `certs` on a port of its own
    /// (see [`Cluster::tls_ports`]), on its bus and for replication, and started with
    /// `extra` arguments.
    pub(crate) fn start_tls(certs: &Certs, extra: &[&str]) -> Cluster {
        Self::start_with(&Options {
            tls: Some(certs),
            extra,
        })
    }

    fn start_with(options: &Options<'_>) -> Cluster {
        // One cluster starts at a time: six nodes meeting, electing and syncing replicas at
        // once, several times over on two cores, took longer than any sensible deadline.
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..5 {
            if let Some(cluster) = Self::try_start(options) {
                cluster.wait_ok();
                return cluster;
            }
        }
        panic!("could not start a Redis Cluster on free ports");
    }

    /// `None` if a node could not start (its port was taken meanwhile).
    fn try_start(options: &Options<'_>) -> Option<Cluster> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cluster = Cluster {
            nodes: Vec::new(),
            _dir: dir,
        };
        // A port the system has just said is free may be said free again: every port of the
        // cluster (client, bus, TLS) is one no other node of it has.
        let mut taken = std::collections::HashSet::new();
        let mut fresh = || loop {
            let port = free_port();
            if taken.insert(port) {
                return port;
            }
        };
        for _ in 0..NODES {
            // Redis 7 takes the bus port as `cluster-port`; by default it is port + 10000,
            // which a free ephemeral port may push past 65535.
            let (port, bus) = (fresh(), fresh());
            let node_dir = cluster._dir.path().join(port.to_string());
            std::fs::create_dir(&node_dir).expect("node dir");
            let tls_port = options.tls.map(|_| fresh());
            let child = spawn_node(port, bus, &node_dir, tls_port, options);
            cluster.nodes.push(Node {
                port,
                tls_port,
                child: Some(child),
            });
        }
        let deadline = Deadline::new();
        for node in &mut cluster.nodes {
            while !answers_ping(node.port, Duration::from_secs(1)) {
                let child = node.child.as_mut().expect("started");
                if let Ok(Some(_)) = child.try_wait() {
                    return None;
                }
                deadline.next_try_blocking(format!("cluster node {} to answer", node.port));
            }
        }
        // A TLS cluster meets on its TLS ports: nodes announce those to each other.
        let mut create = Command::new("redis-cli");
        let mut addrs = cluster.addrs();
        if let Some(certs) = options.tls {
            create.args(["--tls", "--cacert", &certs.ca.display().to_string()]);
            addrs = cluster
                .tls_ports()
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect();
        }
        let status = create
            .arg("--cluster")
            .arg("create")
            .args(addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli must be installed");
        assert!(status.success(), "redis-cli --cluster create failed");
        Some(cluster)
    }

    /// `127.0.0.1:port` of every node, killed ones included.
    pub(crate) fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect()
    }

    /// The TLS port of each node, in the order of [`Cluster::addrs`].
    pub(crate) fn tls_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .map(|node| node.tls_port.expect("a cluster started with TLS"))
            .collect()
    }

    /// The ports of the nodes still running.
    pub(crate) fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect()
    }

    /// The ports of the running nodes that say they are masters (`ROLE`).
    pub(crate) fn masters(&self) -> Vec<u16> {
        self.live_ports()
            .into_iter()
            .filter(|&port| role(port) == "master")
            .collect()
    }

    /// Moves `slots` slots from master `from` to master `to` with `redis-cli --cluster
    /// reshard`, keys and all, while the cluster serves; returns once it is done.
    pub(crate) fn reshard(&self, from: u16, to: u16, slots: usize) {
        self.wait_agreed();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("reshard")
            .arg(format!("127.0.0.1:{from}"))
            .args(["--cluster-from", &node_id(from)])
            .args(["--cluster-to", &node_id(to)])
            .args(["--cluster-slots", &slots.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        assert!(
            output.status.success(),
            "redis-cli --cluster reshard failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }

    /// Moves slot `slot`, which holds no keys, from master `from` to master `to` by hand, as
    /// Redis Cluster's docs describe it (`CLUSTER SETSLOT` IMPORTING, MIGRATING, then NODE on
    /// the target, the source and the other masters); returns once every node agrees.
    pub(crate) fn move_slot(&self, slot: u16, from: u16, to: u16) {
        start_move(slot, from, to);
        let to_id = node_id(to);
        let others = self.masters().into_iter().filter(|&p| p != to && p != from);
        for port in [to, from].into_iter().chain(others) {
            set_owner(port, slot, &to_id);
        }
        self.wait_agreed();
    }

    /// Waits until every running node has the same slot map (redis-cli refuses to reshard
    /// before, and a reshard's last step reaches the other nodes by gossip).
    pub(crate) fn wait_agreed(&self) {
        let deadline = Deadline::within(Duration::from_secs(40));
        loop {
            let maps: Vec<Vec<(i64, i64, i64)>> = self
                .live_ports()
                .into_iter()
                .map(|port| {
                    let slots = Conn::connect(port).query(&["CLUSTER", "SLOTS"]);
                    let mut map: Vec<(i64, i64, i64)> = slots
                        .items()
                        .iter()
                        .map(|e| {
                            let e = e.items();
                            (e[0].int(), e[1].int(), e[2].items()[1].int())
                        })
                        .collect();
                    map.sort();
                    map
                })
                .collect();
            if maps.windows(2).all(|pair| pair[0] == pair[1]) {
                return;
            }
            deadline.next_try_blocking("every node to agree on the slot map");
        }
    }

    /// Stops the node on `port` (SIGSTOP) until the guard returned is dropped (SIGCONT): it
    /// reads nothing meanwhile, as a node stuck in a long script. Within the cluster's node
    /// timeout (2 s) no failover starts.
    pub(crate) fn stop(&self, port: u16) -> Stopped {
        let pid = self
            .nodes
            .iter()
            .find(|node| node.port == port)
            .and_then(|node| node.child.as_ref())
            .map(Child::id)
            .expect("a running node of this cluster");
        super::send_signal(pid, "STOP");
        Stopped(pid)
    }

    /// SIGKILLs the node on `port`.
    pub(crate) fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills a master that has a replica to take over; returns its port.
    pub(crate) fn kill_master(&mut self) -> u16 {
        let master = self.masters()[0];
        self.kill(master);
        master
    }

    /// Waits until a replica of the killed master `killed` has been promoted: every running
    /// node reports `cluster_state:ok` with all slots served, and none names `killed` as the
    /// owner of a slot.
    pub(crate) fn wait_for_failover(&self, killed: u16) {
        let deadline = Deadline::within(Duration::from_secs(40));
        loop {
            let promoted = self.live_ports().into_iter().all(|port| {
                let slots = Conn::connect(port).query(&["CLUSTER", "SLOTS"]);
                let owners: Vec<i64> = slots
                    .items()
                    .iter()
                    .map(|e| e.items()[2].items()[1].int())
                    .collect();
                !owners.contains(&i64::from(killed))
            });
            if promoted && self.all_ok() && self.all_known() {
                return;
            }
            deadline.next_try_blocking("a replica to take over the killed master");
        }
    }

    /// Waits until every running node reports `cluster_state:ok`, serves all 16384 slots, and
    /// knows every other node in its final role (`cluster_state` turns ok before the last
    /// replicas are known everywhere).
    pub(crate) fn wait_ok(&self) {
        let deadline = Deadline::within(Duration::from_secs(60));
        while !(self.all_ok() && self.all_known()) {
            deadline.next_try_blocking("every cluster node to report cluster_state:ok");
        }
    }

    /// Every running node's `CLUSTER NODES` shows the running nodes connected, `MASTERS`
    /// masters with slots and a replica of a master for each other one, and no node in a
    /// handshake.
    fn all_known(&self) -> bool {
        let live = self.live_ports().len();
        self.live_ports().into_iter().all(|port| {
            let nodes = Conn::connect(port).query(&["CLUSTER", "NODES"]).text();
            let lines: Vec<Vec<&str>> = nodes
                .lines()
                .map(|line| line.split(' ').collect())
                .filter(|fields: &Vec<&str>| fields.len() >= 8 && !fields[2].contains("fail"))
                .collect();
            let masters = lines
                .iter()
                .filter(|f| f[2].contains("master") && f.len() > 8)
                .count();
            let replicas = lines
                .iter()
                .filter(|f| f[2].contains("slave") && f[3] != "-")
                .count();
            let settled = lines.iter().all(|f| {
                f[7] == "connected" && !f[2].contains("handshake") && !f[2].contains("noaddr")
            });
            lines.len() == live
                && masters == MASTERS
                && replicas == live - MASTERS
                && settled
                && replicas_online(port)
        })
    }

    fn all_ok(&self) -> bool {
        self.live_ports().into_iter().all(|port| {
            let info = Conn::connect(port).query(&["CLUSTER", "INFO"]).text();
            info.contains("cluster_state:ok\r\n") && info.contains("cluster_slots_ok:16384\r\n")
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn_node(
    port: u16,
    bus: u16,
    dir: &Path,
    tls_port: Option<u16>,
    options: &Options<'_>,
) -> Child {
    let mut tls = Vec::new();
    if let (Some(certs), Some(tls_port)) = (options.tls, tls_port) {
        let file = |path: &Path| path.display().to_string();
        tls = vec![
            "--tls-port".to_string(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            file(&certs.server_cert),
            "--tls-key-file".into(),
            file(&certs.server_key),
            "--tls-ca-cert-file".into(),
            file(&certs.ca),
            "--tls-auth-clients".into(),
            "no".into(),
            "--tls-cluster".into(),
            "yes".into(),
            "--tls-replication".into(),
            "yes".into(),
        ];
    }
    Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(tls)
        .args(options.extra)
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-port", &bus.to_string()])
        .args([
            "--cluster-config-file",
            &dir.join("nodes.conf").display().to_string(),
        ])
        .args(["--cluster-node-timeout", "2000"])
        // A master pings its replicas every second instead of every ten, so their replication
        // offsets, which CLUSTER SHARDS and SLOTS wait for, move soon after the cluster forms.
        .args(["--repl-ping-replica-period", "1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--bind", "127.0.0.1"])
        .args(["--dir", &dir.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed")
}

/// Whether `CLUSTER SHARDS` on `port` calls every replica that has not failed `online`. Redis
/// 7.0 calls a replica `loading`, and leaves it out of `CLUSTER SLOTS`, until the node has
/// heard of a replication offset above 0 for it.
fn replicas_online(port: u16) -> bool {
    let shards = Conn::connect(port).query(&["CLUSTER", "SHARDS"]);
    shards.items().iter().all(|shard| {
        let nodes = field(shard, "nodes");
        nodes.items().iter().all(|node| {
            let health = field(node, "health").text();
            field(node, "role").text() != "replica" || health == "online" || health == "fail"
        })
    })
}

/// The value of `name` in a RESP2 map (a flat key/value array).
fn field<'a>(map: &'a Resp, name: &str) -> &'a Resp {
    map.items()
        .chunks(2)
        .find(|pair| pair[0].text() == name)
        .map(|pair| &pair[1])
        .unwrap_or_else(|| panic!("no {name} in {map:?}"))
}

/// Starts moving `slot` from master `from` to master `to` (IMPORTING, MIGRATING).
pub(crate) fn start_move(slot: u16, from: u16, to: u16) {
    let slot = slot.to_string();
    let (from_id, to_id) = (node_id(from), node_id(to));
    let ok = Resp::Simple("OK".into());
    let importing = ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id];
    assert_eq!(Conn::connect(to).query(&importing), ok);
    let migrating = ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id];
    assert_eq!(Conn::connect(from).query(&migrating), ok);
}

/// `CLUSTER SETSLOT slot NODE id` on `port`.
pub(crate) fn set_owner(port: u16, slot: u16, id: &str) {
    let slot = slot.to_string();
    let reply = Conn::connect(port).query(&["CLUSTER", "SETSLOT", &slot, "NODE", id]);
    assert_eq!(reply, Resp::Simple("OK".into()), "SETSLOT NODE on {port}");
}

/// The node's id in the cluster.
pub(crate) fn node_id(port: u16) -> String {
    Conn::connect(port).query(&["CLUSTER", "MYID"]).text()
}

/// The first field of `ROLE`: `master` or `slave`.
fn role(port: u16) -> String {
    Conn::connect(port).query(&["ROLE"]).items()[0].text()
}

/// A blocking connection to one node.
pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    scanner: ReplyScanner,
}

impl Conn {
    pub(crate) fn connect(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to a node");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: Vec::new(),
            scanner: ReplyScanner::new(),
        }
    }

    /// Sends one command, returns its reply's bytes.
    pub(crate) fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.pipeline(&[args.to_vec()]).remove(0)
    }

    /// `call` with string arguments, the reply decoded.
    pub(crate) fn query(&mut self, args: &[&str]) -> Resp {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        parse(&self.call(&args))
    }

    /// Sends many commands, returns their replies' bytes in order. Written in batches, each
    /// read back before the next is written, so neither side's buffers fill up.
    pub(crate) fn pipeline(&mut self, commands: &[Vec<&[u8]>]) -> Vec<Vec<u8>> {
        let mut replies = Vec::with_capacity(commands.len());
        for batch in commands.chunks(256) {
            let mut out = Vec::new();
            for args in batch {
                out.extend_from_slice(&encode_command(args.iter().copied()));
            }
            self.stream.write_all(&out).expect("write to a node");
            for _ in batch {
                replies.push(self.read_reply());
            }
        }
        replies
    }

    /// The next reply or push frame (a subscriber's message).
    pub(crate) fn next(&mut self) -> Resp {
        parse(&self.read_reply())
    }

    fn read_reply(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.scanner.next_reply(&self.buf).expect("valid RESP") {
                self.scanner.consumed(end);
                return self.buf.drain(..end).collect();
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).expect("read from a node");
            assert!(n > 0, "the node closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A decoded RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Resp>),
    Null,
}

impl Resp {
    pub(crate) fn text(&self) -> String {
        match self {
            Resp::Simple(s) | Resp::Error(s) => s.clone(),
            Resp::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            Resp::Int(i) => i.to_string(),
            other => panic!("not text: {other:?}"),
        }
    }

    pub(crate) fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(items) => items,
            other => panic!("not an array: {other:?}"),
        }
    }

    pub(crate) fn int(&self) -> i64 {
        match self {
            Resp::Int(i) => *i,
            other => panic!("not an integer: {other:?}"),
        }
    }
}

/// Decodes one complete RESP2 reply.
pub(crate) fn parse(bytes: &[u8]) -> Resp {
    let (value, rest) = parse_at(bytes);
    assert!(rest.is_empty(), "trailing bytes after a reply");
    value
}

fn parse_at(bytes: &[u8]) -> (Resp, &[u8]) {
    let line_end = bytes
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a complete line");
    let line = std::str::from_utf8(&bytes[1..line_end]).expect("ASCII header");
    let rest = &bytes[line_end + 2..];
    match bytes[0] {
        b'+' => (Resp::Simple(line.to_string()), rest),
        b'-' => (Resp::Error(line.to_string()), rest),
        b':' => (Resp::Int(line.parse().expect("integer")), rest),
        b'$' => match line.parse::<i64>().expect("length") {
            -1 => (Resp::Null, rest),
            len => {
                let len = len as usize;
                (Resp::Bulk(rest[..len].to_vec()), &rest[len + 2..])
            }
        },
        b'*' => match line.parse::<i64>().expect("count") {
            -1 => (Resp::Null, rest),
            count => {
                let mut items = Vec::new();
                let mut rest = rest;
                for _ in 0..count {
                    let (item, after) = parse_at(rest);
                    items.push(item);
                    rest = after;
                }
                (Resp::Array(items), rest)
            }
        },
        other => panic!("unexpected RESP2 type byte {other:#x}"),
    }
}
