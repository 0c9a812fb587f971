//! The VM behind a profile: asking for it and for its stop ([`api`]), where it may be ([`targets`]), waiting
//! for its sshd ([`readiness`]), and its life across connections ([`lifecycle`]), kept in shared files
//! ([`store`]).

pub mod api;
pub mod lifecycle;
pub mod readiness;
pub mod store;
pub mod targets;
