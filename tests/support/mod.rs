//! Integration-test kit for keyward: real `redis-server` and `keyward`
//! processes on loopback ports, plus clients (fred, raw RESP sockets, a tiny
//! HTTP/1.1 getter) to drive them.
//!
//! Test files pull it in with `mod support;` and usually `use support::*;`.
//! Everything is flat re-exported here so tests need not know the layout.
//!
//! Ground rules the kit follows (and tests should too): nothing sleeps a
//! fixed time to "let things settle"; every wait polls a condition against a
//! deadline and panics with a description (and the relevant process log) when
//! the deadline passes.

// Each tests/*.rs file is its own crate and compiles this module separately;
// most of them use only a few helpers, so unused helpers and the re-exports
// below must not warn.
#![allow(dead_code, unused_imports)]

mod clients;
mod http;
mod keyward;
mod ports;
mod proc;
mod raw;
mod redis;
mod resp;
pub mod sentinel;
mod wait;

pub use clients::{client, client_auth, client_resp3, client_with, try_client};
// Re-exported so tests choosing a protocol need no extra `use fred::...`.
pub use fred::types::RespVersion;
pub use http::{http_get, http_post, http_request};
pub use keyward::Keyward;
pub use ports::free_port;
pub use proc::send_signal;
pub use raw::Raw;
pub use redis::{redis_cmd, redis_pipeline, Redis};
pub use resp::{cmd, esc, frame_len, split_frames};
pub use sentinel::*;
pub use wait::{wait_until, wait_until_sync};

use std::time::Duration;

/// The default deadline for "should happen soon" waits in the kit: long
/// enough for a loaded 2-core CI box, short enough that a hang fails the run.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Interval between polls of a condition. Short, so tests stay fast, but not
/// a busy loop that would starve the processes being waited on.
pub const POLL: Duration = Duration::from_millis(20);
