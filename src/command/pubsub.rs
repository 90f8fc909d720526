//! What the pub/sub commands are about, as data the pub/sub layer and the client share.

/// Channels, patterns and shard channels are separate name spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    Channel,
    Pattern,
    Shard,
}

impl Namespace {
    /// The command that (un)subscribes this kind, which is also the first word of its
    /// confirmation frames.
    pub fn command(self, subscribe: bool) -> &'static str {
        match (self, subscribe) {
            (Namespace::Channel, true) => "subscribe",
            (Namespace::Pattern, true) => "psubscribe",
            (Namespace::Shard, true) => "ssubscribe",
            (Namespace::Channel, false) => "unsubscribe",
            (Namespace::Pattern, false) => "punsubscribe",
            (Namespace::Shard, false) => "sunsubscribe",
        }
    }
}

/// What a command counts, whose reply redmux corrects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// PUBLISH: receivers of the channel, by channel and by pattern.
    Publish,
    /// SPUBLISH: receivers of the shard channel.
    SPublish,
    /// PUBSUB NUMSUB: subscribers of each channel named (patterns aside).
    NumSub,
    /// PUBSUB SHARDNUMSUB.
    ShardNumSub,
    /// PUBSUB CHANNELS [pattern]: the channels anyone is subscribed to.
    Channels,
    /// PUBSUB SHARDCHANNELS [pattern].
    ShardChannels,
}

impl Count {
    /// The argument the correction needs, by its place in the request: the channel published
    /// to, or the pattern CHANNELS filters by.
    pub fn argument_index(self) -> Option<usize> {
        match self {
            Count::Publish | Count::SPublish => Some(1),
            Count::Channels | Count::ShardChannels => Some(2),
            Count::NumSub | Count::ShardNumSub => None,
        }
    }
}
