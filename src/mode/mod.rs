//! The two ways a connection reaches [`crate::session`]: one process per connection, or one daemon for all.

pub mod activated;
pub mod daemon;
