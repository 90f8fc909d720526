//! Who owns which slot: a cluster's topology read from one node's `CLUSTER SHARDS` reply (Redis
//! 7.0 and later) or, from older servers, its `CLUSTER SLOTS` reply, kept as an immutable
//! [`SlotMap`]. A new topology is a new map, swapped in whole, so a request never sees half of
//! one and half of another.
//!
//! SHARDS is preferred because it says each node's health: while a failed master's slots wait
//! for a replica to take over, SLOTS still names the failed master as their owner, SHARDS
//! marks it `fail`, and this map leaves those slots unassigned instead of sending requests to a
//! dead node.

use std::collections::HashMap;

use super::reply::{decode, ReplyFormatError, Value};
use super::slot::SLOTS;

/// `SlotMap::owner` of a slot no online master serves.
pub const UNASSIGNED: u16 = u16::MAX;

/// A cluster node, as clients should reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    /// The node's preferred endpoint (`cluster-preferred-endpoint-type`: its IP, or its
    /// hostname). Empty when Redis reports the endpoint unknown (a null), which its docs say
    /// means "the address you asked"; `?` when a hostname is wanted but the node has none.
    pub host: String,
    /// The port redmux reaches it on: its plaintext `port`, or its `tls-port` when redmux
    /// speaks TLS to the cluster (each when the node has only that one).
    pub port: u16,
    /// The 40-character node ID: stays the same when the address changes.
    pub id: String,
}

/// The slot owners of a cluster at one moment.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// The online masters that own at least one slot, ordered by the first slot they own (so
    /// the maps of SHARDS and SLOTS replies of one topology compare equal).
    masters: Vec<Node>,
    /// For each master, its online replicas, ordered by ID.
    replicas: Vec<Vec<Node>>,
    /// For each slot, the index of its master in `masters`, or [`UNASSIGNED`].
    owner: Box<[u16]>,
}

/// A topology reply that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// Redis answered with an error: from a server before 7.0, `CLUSTER SHARDS` is an unknown
    /// subcommand, and the caller falls back to `CLUSTER SLOTS`.
    #[error("Redis replied with an error: {0}")]
    ErrorReply(String),
    #[error("not a valid reply: {0}")]
    Format(#[from] ReplyFormatError),
    #[error("unexpected shape: {0}")]
    Shape(&'static str),
    #[error("slot range {0}-{1} is not within 0-16383")]
    BadRange(i64, i64),
    #[error("slot {0} is claimed by two masters")]
    ClaimedTwice(u16),
    #[error("more masters than a slot map can index")]
    TooManyMasters,
}

impl SlotMap {
    /// Reads a `CLUSTER SHARDS` reply (RESP2 or RESP3). A shard's master is its node with
    /// `role` master and `health` online; a shard without one leaves its slots unassigned.
    /// Replicas count when their `health` is online (Redis 7.0 says `loading` for a replica
    /// that has not yet received any replication stream). `tls`: redmux reaches the nodes
    /// over TLS, so a node's `tls-port` is taken where it has one (a cluster on its way to
    /// TLS keeps its plaintext `port` open too, and SHARDS names both).
    pub fn from_shards(reply: &[u8], tls: bool) -> Result<SlotMap, TopologyError> {
        let shards = top_level(reply)?;
        let mut builder = Builder::default();
        for shard in &shards {
            let fields = map(shard, "a shard is not a map")?;
            let slots = field(&fields, b"slots")
                .and_then(as_array)
                .ok_or(TopologyError::Shape("a shard has no slots array"))?;
            let nodes = field(&fields, b"nodes")
                .and_then(as_array)
                .ok_or(TopologyError::Shape("a shard has no nodes array"))?;
            let mut master = None;
            let mut replicas = Vec::new();
            for node in nodes {
                let info = map(node, "a shard node is not a map")?;
                let online = field(&info, b"health").and_then(Value::bytes) == Some(&b"online"[..]);
                if !online {
                    continue;
                }
                match field(&info, b"role").and_then(Value::bytes) {
                    Some(b"master") if master.is_none() => master = Some(shard_node(&info, tls)?),
                    Some(b"replica") => replicas.push(shard_node(&info, tls)?),
                    _ => {}
                }
            }
            let ranges = ranges(slots)?;
            if let Some(master) = master {
                builder.add(master, replicas, &ranges)?;
            }
        }
        builder.build()
    }

    /// Reads a `CLUSTER SLOTS` reply (RESP2 or RESP3): entries of a slot range, its master,
    /// then its replicas. SLOTS leaves out failed replicas but not failed masters, so use it
    /// only where SHARDS is unknown.
    pub fn from_slots(reply: &[u8]) -> Result<SlotMap, TopologyError> {
        let entries = top_level(reply)?;
        let mut builder = Builder::default();
        for entry in &entries {
            let Value::Array(parts) = entry else {
                return Err(TopologyError::Shape("a SLOTS entry is not an array"));
            };
            let [start, end, master, replicas @ ..] = parts.as_slice() else {
                return Err(TopologyError::Shape("a SLOTS entry has no master"));
            };
            let range = match (start.int(), end.int()) {
                (Some(start), Some(end)) => check_range(start, end)?,
                _ => return Err(TopologyError::Shape("a SLOTS range is not two integers")),
            };
            let replicas = replicas
                .iter()
                .map(slots_node)
                .collect::<Result<Vec<_>, _>>()?;
            builder.add(slots_node(master)?, replicas, &[range])?;
        }
        builder.build()
    }

    /// The master serving `slot`, if any online master does.
    pub fn master_for(&self, slot: u16) -> Option<&Node> {
        self.owner(slot).map(|at| &self.masters[at])
    }

    /// The index in [`SlotMap::masters`] of the master serving `slot`.
    pub fn owner(&self, slot: u16) -> Option<usize> {
        match self.owner.get(usize::from(slot)) {
            Some(&at) if at != UNASSIGNED => Some(usize::from(at)),
            _ => None,
        }
    }

    /// The online masters that own slots.
    pub fn masters(&self) -> &[Node] {
        &self.masters
    }

    /// The online replicas of `masters()[master]`.
    pub fn replicas(&self, master: usize) -> &[Node] {
        self.replicas.get(master).map_or(&[], Vec::as_slice)
    }

    /// How many slots no online master serves: 0 when the cluster covers every slot.
    pub fn unassigned(&self) -> usize {
        self.owner.iter().filter(|&&at| at == UNASSIGNED).count()
    }
}

/// Shows the owners as slot ranges, not 16384 numbers.
impl std::fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ranges = Vec::new();
        let mut start = 0;
        for slot in 1..=self.owner.len() {
            if slot == self.owner.len() || self.owner[slot] != self.owner[start] {
                let owner = match self.owner[start] {
                    UNASSIGNED => "-".to_string(),
                    at => at.to_string(),
                };
                ranges.push(format!("{start}-{}:{owner}", slot - 1));
                start = slot;
            }
        }
        f.debug_struct("SlotMap")
            .field("masters", &self.masters)
            .field("replicas", &self.replicas)
            .field("owner", &ranges)
            .finish()
    }
}

/// Collects masters by ID (a master owning several ranges comes once), then orders them.
#[derive(Default)]
struct Builder {
    masters: Vec<Node>,
    replicas: Vec<Vec<Node>>,
    by_id: HashMap<String, usize>,
    /// Slot → index into the unordered `masters`.
    owner: Vec<Option<usize>>,
}

impl Builder {
    fn add(
        &mut self,
        master: Node,
        replicas: Vec<Node>,
        ranges: &[(u16, u16)],
    ) -> Result<(), TopologyError> {
        if ranges.is_empty() {
            return Ok(());
        }
        if self.owner.is_empty() {
            self.owner = vec![None; SLOTS];
        }
        let at = match self.by_id.get(&master.id) {
            Some(&at) => at,
            None => {
                self.by_id.insert(master.id.clone(), self.masters.len());
                self.masters.push(master);
                self.replicas.push(Vec::new());
                self.masters.len() - 1
            }
        };
        for replica in replicas {
            if !self.replicas[at].iter().any(|known| known.id == replica.id) {
                self.replicas[at].push(replica);
            }
        }
        for &(start, end) in ranges {
            for slot in start..=end {
                let owner = &mut self.owner[usize::from(slot)];
                match owner {
                    Some(other) if *other != at => return Err(TopologyError::ClaimedTwice(slot)),
                    _ => *owner = Some(at),
                }
            }
        }
        Ok(())
    }

    fn build(self) -> Result<SlotMap, TopologyError> {
        if self.masters.len() >= usize::from(UNASSIGNED) {
            return Err(TopologyError::TooManyMasters);
        }
        // Order masters by the first slot each owns.
        let mut first_slot = vec![usize::MAX; self.masters.len()];
        for (slot, owner) in self.owner.iter().enumerate() {
            if let Some(at) = *owner {
                first_slot[at] = first_slot[at].min(slot);
            }
        }
        let mut order: Vec<usize> = (0..self.masters.len()).collect();
        order.sort_by_key(|&at| first_slot[at]);
        let mut new_index = vec![0u16; self.masters.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new as u16;
        }
        let mut masters = Vec::with_capacity(order.len());
        let mut replicas = Vec::with_capacity(order.len());
        let (mut old_masters, mut old_replicas) = (self.masters, self.replicas);
        for &old in &order {
            masters.push(std::mem::replace(&mut old_masters[old], empty_node()));
            let mut these = std::mem::take(&mut old_replicas[old]);
            these.sort_by(|a, b| a.id.cmp(&b.id));
            replicas.push(these);
        }
        let owner = match self.owner.is_empty() {
            true => vec![UNASSIGNED; SLOTS],
            false => self
                .owner
                .iter()
                .map(|owner| owner.map_or(UNASSIGNED, |at| new_index[at]))
                .collect(),
        };
        Ok(SlotMap {
            masters,
            replicas,
            owner: owner.into_boxed_slice(),
        })
    }
}

fn empty_node() -> Node {
    Node {
        host: String::new(),
        port: 0,
        id: String::new(),
    }
}

/// The top-level array of a topology reply.
fn top_level(reply: &[u8]) -> Result<Vec<Value<'_>>, TopologyError> {
    match decode(reply)? {
        Value::Array(items) => Ok(items),
        Value::Error(text) => Err(TopologyError::ErrorReply(
            String::from_utf8_lossy(text).into_owned(),
        )),
        _ => Err(TopologyError::Shape("the reply is not an array")),
    }
}

fn as_array<'v, 'a>(value: &'v Value<'a>) -> Option<&'v [Value<'a>]> {
    match value {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

/// A map (RESP3) or flat key/value array (RESP2) as its pairs.
fn map<'v, 'a>(
    value: &'v Value<'a>,
    what: &'static str,
) -> Result<Vec<(&'a [u8], &'v Value<'a>)>, TopologyError> {
    let items = as_array(value).ok_or(TopologyError::Shape(what))?;
    if items.len() % 2 != 0 {
        return Err(TopologyError::Shape(what));
    }
    items
        .chunks(2)
        .map(|pair| match pair[0].bytes() {
            Some(key) => Ok((key, &pair[1])),
            None => Err(TopologyError::Shape(what)),
        })
        .collect()
}

fn field<'v, 'a>(fields: &[(&'a [u8], &'v Value<'a>)], name: &[u8]) -> Option<&'v Value<'a>> {
    fields
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| *value)
}

/// A SHARDS node: `endpoint` (else `ip`), `port` or `tls-port` (the one of `tls` first, else
/// the other), `id`.
fn shard_node(info: &[(&[u8], &Value<'_>)], tls: bool) -> Result<Node, TopologyError> {
    let host = match field(info, b"endpoint").or_else(|| field(info, b"ip")) {
        Some(Value::Null) => String::new(),
        Some(value) => text(value, "a node's endpoint is not a string")?,
        None => return Err(TopologyError::Shape("a node has no endpoint")),
    };
    let (first, second): (&[u8], &[u8]) = match tls {
        true => (b"tls-port", b"port"),
        false => (b"port", b"tls-port"),
    };
    let port = field(info, first)
        .or_else(|| field(info, second))
        .ok_or(TopologyError::Shape("a node has no port"))?;
    let id = field(info, b"id").ok_or(TopologyError::Shape("a node has no id"))?;
    Ok(Node {
        host,
        port: port_of(port)?,
        id: text(id, "a node's id is not a string")?,
    })
}

/// A SLOTS node: `[endpoint, port, id, metadata...]`.
fn slots_node(value: &Value<'_>) -> Result<Node, TopologyError> {
    let Value::Array(parts) = value else {
        return Err(TopologyError::Shape("a SLOTS node is not an array"));
    };
    let [host, port, id, ..] = parts.as_slice() else {
        return Err(TopologyError::Shape(
            "a SLOTS node lacks endpoint, port or id",
        ));
    };
    let host = match host {
        Value::Null => String::new(),
        other => text(other, "a SLOTS endpoint is not a string")?,
    };
    Ok(Node {
        host,
        port: port_of(port)?,
        id: text(id, "a SLOTS node id is not a string")?,
    })
}

fn text(value: &Value<'_>, what: &'static str) -> Result<String, TopologyError> {
    let bytes = value.bytes().ok_or(TopologyError::Shape(what))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| TopologyError::Shape(what))
}

fn port_of(value: &Value<'_>) -> Result<u16, TopologyError> {
    value
        .int()
        .and_then(|port| u16::try_from(port).ok())
        .ok_or(TopologyError::Shape("a port is not a number in 0-65535"))
}

/// A SHARDS `slots` array: start and end of each range in turn.
fn ranges(slots: &[Value<'_>]) -> Result<Vec<(u16, u16)>, TopologyError> {
    if slots.len() % 2 != 0 {
        return Err(TopologyError::Shape(
            "a shard's slots are not start/end pairs",
        ));
    }
    slots
        .chunks(2)
        .map(|pair| match (pair[0].int(), pair[1].int()) {
            (Some(start), Some(end)) => check_range(start, end),
            _ => Err(TopologyError::Shape("a slot is not an integer")),
        })
        .collect()
}

fn check_range(start: i64, end: i64) -> Result<(u16, u16), TopologyError> {
    let max = SLOTS as i64 - 1;
    match (0..=max).contains(&start) && (start..=max).contains(&end) {
        true => Ok((start as u16, end as u16)),
        false => Err(TopologyError::BadRange(start, end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Replies captured from a redis-server 7.0.15 cluster of three masters with a replica
    // each, on ports 17100-17105 (see the test names for the state each shows).
    const HEALTHY_SHARDS: &[u8] = include_bytes!("fixtures/healthy-shards.resp2");
    const HEALTHY_SHARDS3: &[u8] = include_bytes!("fixtures/healthy-shards.resp3");
    /// Nodes with `tls-cluster yes` and both ports open: plaintext 710x, TLS 720x.
    const TLS_SHARDS: &[u8] = include_bytes!("fixtures/tls-shards.resp2");
    const HEALTHY_SLOTS: &[u8] = include_bytes!("fixtures/healthy-slots.resp2");
    const HEALTHY_SLOTS3: &[u8] = include_bytes!("fixtures/healthy-slots.resp3");
    const RESHARDED_SHARDS: &[u8] = include_bytes!("fixtures/resharded-shards.resp2");
    const RESHARDED_SLOTS: &[u8] = include_bytes!("fixtures/resharded-slots.resp2");
    const FAILOVER_SHARDS: &[u8] = include_bytes!("fixtures/failover-shards.resp2");
    const FAILOVER_SLOTS: &[u8] = include_bytes!("fixtures/failover-slots.resp2");
    const MID_FAILOVER_SHARDS: &[u8] = include_bytes!("fixtures/midfailover-shards.resp2");
    const MID_FAILOVER_SLOTS: &[u8] = include_bytes!("fixtures/midfailover-slots.resp2");
    const HOSTNAMES_SHARDS: &[u8] = include_bytes!("fixtures/hostnames-shards.resp2");
    const HOSTNAMES_SHARDS3: &[u8] = include_bytes!("fixtures/hostnames-shards.resp3");
    const HOSTNAMES_SLOTS: &[u8] = include_bytes!("fixtures/hostnames-slots.resp2");
    const HOSTNAMES_SLOTS3: &[u8] = include_bytes!("fixtures/hostnames-slots.resp3");

    fn ports(map: &SlotMap) -> Vec<u16> {
        map.masters().iter().map(|node| node.port).collect()
    }

    fn port_of_slot(map: &SlotMap, slot: u16) -> Option<u16> {
        map.master_for(slot).map(|node| node.port)
    }

    #[test]
    fn a_healthy_cluster() {
        let map = SlotMap::from_shards(HEALTHY_SHARDS, false).unwrap();
        assert_eq!(ports(&map), [17100, 17101, 17102]);
        assert_eq!(map.unassigned(), 0);
        assert_eq!(port_of_slot(&map, 0), Some(17100));
        assert_eq!(port_of_slot(&map, 5460), Some(17100));
        assert_eq!(port_of_slot(&map, 5461), Some(17101));
        assert_eq!(port_of_slot(&map, 16383), Some(17102));
        assert_eq!(port_of_slot(&map, 16384), None);
        let first = &map.masters()[0];
        assert_eq!(first.host, "127.0.0.1");
        assert_eq!(first.id, "5ba72b64ac96aac624a9184a745454b52b108f47");
        let replicas: Vec<u16> = (0..3).map(|m| map.replicas(m)[0].port).collect();
        assert_eq!(replicas, [17103, 17104, 17105]);
        assert!(map.replicas(3).is_empty());
        // SLOTS, and both in RESP3, say the same.
        assert_eq!(SlotMap::from_slots(HEALTHY_SLOTS).unwrap(), map);
        assert_eq!(SlotMap::from_shards(HEALTHY_SHARDS3, false).unwrap(), map);
        assert_eq!(SlotMap::from_slots(HEALTHY_SLOTS3).unwrap(), map);
    }

    #[test]
    fn a_node_is_reached_on_the_port_of_the_protocol_redmux_speaks() {
        let plain = SlotMap::from_shards(TLS_SHARDS, false).unwrap();
        assert_eq!(ports(&plain), [7101, 7102, 7103]);
        let tls = SlotMap::from_shards(TLS_SHARDS, true).unwrap();
        assert_eq!(ports(&tls), [7201, 7202, 7203]);
        let replicas: Vec<u16> = (0..3).map(|m| tls.replicas(m)[0].port).collect();
        assert!(
            replicas.iter().all(|port| (7204..=7206).contains(port)),
            "{replicas:?}"
        );
        // A node with one port is reached on it whatever redmux speaks.
        assert_eq!(
            SlotMap::from_shards(HEALTHY_SHARDS, true).unwrap(),
            SlotMap::from_shards(HEALTHY_SHARDS, false).unwrap()
        );
    }

    #[test]
    fn a_master_with_two_ranges_comes_once() {
        // 17102 also took slots 0-4 from 17100.
        let map = SlotMap::from_shards(RESHARDED_SHARDS, false).unwrap();
        assert_eq!(ports(&map), [17102, 17100, 17101]);
        assert_eq!(port_of_slot(&map, 4), Some(17102));
        assert_eq!(port_of_slot(&map, 5), Some(17100));
        assert_eq!(port_of_slot(&map, 10923), Some(17102));
        assert_eq!(map.unassigned(), 0);
        assert_eq!(SlotMap::from_slots(RESHARDED_SLOTS).unwrap(), map);
    }

    #[test]
    fn after_a_failover_the_promoted_replica_is_the_master() {
        // 17101 was killed; its replica 17104 took over. SHARDS still lists 17101, failed.
        let map = SlotMap::from_shards(FAILOVER_SHARDS, false).unwrap();
        assert_eq!(ports(&map), [17102, 17100, 17104]);
        assert_eq!(port_of_slot(&map, 5461), Some(17104));
        assert!(map.replicas(2).is_empty());
        assert_eq!(map.unassigned(), 0);
        assert_eq!(SlotMap::from_slots(FAILOVER_SLOTS).unwrap(), map);
    }

    #[test]
    fn during_a_failover_shards_leaves_the_failed_masters_slots_unassigned() {
        // 17100 was just killed and marked failed; no replica has taken over yet.
        let map = SlotMap::from_shards(MID_FAILOVER_SHARDS, false).unwrap();
        assert_eq!(port_of_slot(&map, 5), None);
        assert_eq!(port_of_slot(&map, 5460), None);
        assert_eq!(map.unassigned(), 5456);
        assert_eq!(port_of_slot(&map, 0), Some(17105));
        assert_eq!(port_of_slot(&map, 5461), Some(17104));
        // SLOTS cannot tell: it still names the dead master.
        let slots = SlotMap::from_slots(MID_FAILOVER_SLOTS).unwrap();
        assert_eq!(port_of_slot(&slots, 5), Some(17100));
        assert_eq!(slots.unassigned(), 0);
    }

    #[test]
    fn hostnames_are_the_endpoint_when_preferred() {
        let map = SlotMap::from_shards(HOSTNAMES_SHARDS, false).unwrap();
        let hosts: Vec<&str> = map.masters().iter().map(|n| n.host.as_str()).collect();
        assert_eq!(
            hosts,
            [
                "host-17105.example",
                "host-17103.example",
                "host-17104.example"
            ]
        );
        assert_eq!(map.unassigned(), 0);
        assert_eq!(SlotMap::from_slots(HOSTNAMES_SLOTS).unwrap(), map);
        assert_eq!(SlotMap::from_shards(HOSTNAMES_SHARDS3, false).unwrap(), map);
        assert_eq!(SlotMap::from_slots(HOSTNAMES_SLOTS3).unwrap(), map);
    }

    #[test]
    fn debug_shows_slot_ranges() {
        let map = SlotMap::from_shards(MID_FAILOVER_SHARDS, false).unwrap();
        let text = format!("{map:?}");
        assert!(
            text.contains(r#"owner: ["0-4:0", "5-5460:-", "5461-10922:1", "10923-16383:0"]"#),
            "{text}"
        );
    }

    #[test]
    fn an_error_reply_is_reported_for_the_fallback() {
        assert_eq!(
            SlotMap::from_shards(
                b"-ERR unknown subcommand 'shards'. Try CLUSTER HELP.\r\n",
                false
            ),
            Err(TopologyError::ErrorReply(
                "ERR unknown subcommand 'shards'. Try CLUSTER HELP.".into()
            ))
        );
    }

    #[test]
    fn an_empty_cluster_has_every_slot_unassigned() {
        for map in [
            SlotMap::from_shards(b"*0\r\n", false),
            SlotMap::from_slots(b"*0\r\n"),
        ] {
            let map = map.unwrap();
            assert!(map.masters().is_empty());
            assert_eq!(map.unassigned(), SLOTS);
            assert_eq!(map.master_for(0), None);
        }
    }

    #[test]
    fn null_endpoints_are_empty_hosts() {
        let slots = b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$-1\r\n:7000\r\n$2\r\nab\r\n";
        let map = SlotMap::from_slots(slots).unwrap();
        assert_eq!(
            map.masters(),
            [Node {
                host: String::new(),
                port: 7000,
                id: "ab".into()
            }]
        );
    }

    #[test]
    fn bad_replies_are_errors() {
        let cases: &[&[u8]] = &[
            b"+OK\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n*2\r\n:0\r\n:1\r\n",
            b"*1\r\n*3\r\n:0\r\n:16384\r\n*3\r\n$1\r\nh\r\n:1\r\n$1\r\ni\r\n",
            b"*1\r\n*3\r\n:5\r\n:4\r\n*3\r\n$1\r\nh\r\n:1\r\n$1\r\ni\r\n",
            b"*1\r\n*3\r\n:0\r\n:1\r\n*3\r\n$1\r\nh\r\n:65536\r\n$1\r\ni\r\n",
            b"*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n$1\r\nh\r\n:1\r\n",
            b"*2\r\n*3\r\n:0\r\n:1\r\n*3\r\n$1\r\nh\r\n:1\r\n$1\r\ni\r\n\
              *3\r\n:1\r\n:2\r\n*3\r\n$1\r\nh\r\n:2\r\n$1\r\nj\r\n",
        ];
        for reply in cases {
            assert!(
                SlotMap::from_slots(reply).is_err(),
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
        let shards: &[&[u8]] = &[
            b"*1\r\n*1\r\n$5\r\nslots\r\n",
            b"*1\r\n*2\r\n$5\r\nslots\r\n*0\r\n",
            b"*1\r\n*4\r\n$5\r\nslots\r\n*1\r\n:0\r\n$5\r\nnodes\r\n*0\r\n",
            b"*1\r\n*4\r\n$5\r\nslots\r\n*2\r\n:0\r\n:1\r\n$5\r\nnodes\r\n*1\r\n:1\r\n",
        ];
        for reply in shards {
            assert!(
                SlotMap::from_shards(reply, false).is_err(),
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
        // Truncated captures never panic.
        for end in 0..HEALTHY_SHARDS.len() {
            assert!(SlotMap::from_shards(&HEALTHY_SHARDS[..end], false).is_err());
        }
        for end in 0..HEALTHY_SLOTS.len() {
            assert!(SlotMap::from_slots(&HEALTHY_SLOTS[..end]).is_err());
        }
    }
}
