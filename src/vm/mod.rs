//! The VM behind a profile: asking for it and for its stop ([`api`]), where it may be ([`targets`]), waiting
//! for its sshd ([`readiness`]), and its life across connections and hosts: the machine ([`state`]), where
//! it is kept ([`store`]), what drives it ([`lifecycle`]), and when it is kept warm ([`warm`]).

pub mod api;
pub mod lifecycle;
pub mod readiness;
pub mod state;
pub mod store;
pub mod targets;
pub mod warm;
