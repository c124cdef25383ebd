//! The admin side: the HTTP listener (health, metrics, JSON views, the
//! dashboard) and the KEYWARD commands and INFO section over RESP.

pub mod commands;
pub mod health;
pub mod http;
pub mod info;
pub mod introspect;
pub mod listener;
