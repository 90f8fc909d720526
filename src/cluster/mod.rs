//! Building blocks for a Redis Cluster upstream, all pure: no sockets, no clocks.
//!
//! How they stack, bottom up: [`slot`] says which of the 16384 hash slots a key is in.

pub mod slot;
