//! Building blocks for a Redis Cluster upstream, all pure: no sockets, no clocks.
//!
//! How they stack, bottom up: [`slot`] says which of the 16384 hash slots a key is in;
//! [`keys`] says where a request's keys are, or that it has none, or that it concerns every
//! master; [`topology`] turns a `CLUSTER SHARDS` or `CLUSTER SLOTS` reply into an immutable map
//! from slot to master; [`plan`] splits the multi-key commands Redis Cluster refuses across
//! slots (MGET, MSET, DEL, UNLINK, EXISTS, TOUCH) into one request per slot and merges the
//! replies, and says when any other request must get `-CROSSSLOT`. [`reply`] is the small
//! reply decoder the last two share; [`redirect`] reads a node's `-MOVED`, `-ASK` and
//! `-TRYAGAIN`, and tells those a node gave from a script's; [`control`] picks the master's
//! answer a SCRIPT KILL, FUNCTION KILL or FUNCTION STATS sent to every master gives.

pub mod control;
pub mod keys;
pub mod plan;
pub mod redirect;
pub mod reply;
pub mod slot;
pub mod topology;
