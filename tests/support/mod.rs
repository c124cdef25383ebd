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

mod admin;
mod cache;
mod client_loop;
mod clients;
mod conn;
mod hot;
mod http;
mod keyward;
mod ports;
mod proc;
mod raw;
mod redis;
mod resp;
mod runtime;
pub mod sentinel;
mod wait;

pub use admin::{get_metrics, metric, metrics, wait_ready};
pub use cache::{cache_hits, cached_reply, hk_in_two_databases, wait_cache_hits};
pub use client_loop::{
    error_summary, longest_ack_gap, missing_on, ClientLoop, Exchange, OUTAGE_ERRORS,
};
pub use clients::{client, client_auth, client_resp3, client_with, try_client};
pub use conn::{Answer, Conn, REPLY_LIMIT};
// Re-exported so tests choosing a protocol need no extra `use fred::...`.
pub use fred::types::RespVersion;
pub use hot::{HotLoad, FAST_HOTKEYS};
pub use http::{http_get, http_post, http_request};
pub use keyward::Keyward;
pub use ports::free_port;
pub use proc::{send_signal, tail};
pub use raw::Raw;
pub use redis::{redis_calls, redis_cmd, redis_cmd_in, redis_pipeline, Redis};
pub use resp::{bulk, cmd, esc, frame_len, ids_masked, split_frames};
pub use runtime::{blocking, within};
pub use sentinel::*;
pub use wait::{wait_until, wait_until_sync};

use std::time::Duration;

/// The default deadline for "should happen soon" waits in the kit: long
/// enough for a loaded 2-core CI box, short enough that a hang fails the run.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Interval between polls of a condition. Short, so tests stay fast, but not
/// a busy loop that would starve the processes being waited on.
pub const POLL: Duration = Duration::from_millis(20);
