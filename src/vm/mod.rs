//! The VM behind a profile: asking for it and for its stop ([`api`]), where it may be ([`targets`]), waiting
//! for its sshd ([`readiness`]), and its life across connections and hosts: the machine ([`state`]), where
//! it is kept ([`store`]), and what drives it ([`lifecycle`]).

pub mod api;
pub mod lifecycle;
pub mod readiness;
pub mod state;
pub mod store;
pub mod targets;
