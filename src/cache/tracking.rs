//! The tracking connection: one RESP3 connection to the master with
//! `CLIENT TRACKING ON OPTIN`, carrying every fill and every invalidation.
//!
//! A fill is `CLIENT CACHING YES`, `MULTI`, `PTTL key`, the command, `EXEC`
//! on this connection; in another database than 0, `CLIENT CACHING YES`,
//! `MULTI`, `SELECT n`, the command, `PTTL key`, `SELECT 0`, `EXEC` (Redis
//! tracks keys by name in every database, so invalidations need no
//! database). Its single reader handles replies and invalidation
//! pushes in wire order (the rueidis model): Redis sends an invalidation for
//! a key only after the read that tracked it, so no fill can land after its
//! own invalidation. The link is pinged every `cache.ping_ms`; a missed
//! pong, a disconnect, `tracking-redir-broken`, a null invalidation
//! (FLUSHALL/FLUSHDB) or any topology change flushes the cache before more
//! hits can be served.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::store::{FlushReason, Ticket};

const TOPOLOGY_CHANGED: &str = "topology changed";
use super::NearCache;
use crate::error::{Error, Kind};
use crate::resp::scan::{elements, parse_int, string_of};
use crate::resp::{reply, Proto, Scanner};
use crate::server::Ctx;
use crate::upstream::connector;

/// A fill asked for by the data path.
pub struct Fill {
    pub key: Bytes,
    /// The store key: the request, after `SELECT n` in a database other than 0.
    pub request: Bytes,
    /// `request` starts with `SELECT n`.
    pub selects: bool,
    pub ticket: Ticket,
}

impl Fill {
    /// Replies the fill gets: CACHING, MULTI, one QUEUED per command in
    /// the transaction, EXEC.
    fn replies(&self) -> u8 {
        if self.selects {
            7
        } else {
            5
        }
    }
}

enum Pending {
    /// A fill, how many of its replies are in, and when it was sent.
    Fill(Fill, u8, Instant),
    /// A PING (every `cache.ping_ms`, or a sync a client asked for) and
    /// when it was sent.
    Ping(Instant),
}

/// Keep the tracking connection up for the current master until shutdown.
pub async fn run(ctx: Arc<Ctx>, cache: Arc<NearCache>, mut fills: mpsc::Receiver<Fill>) {
    let mut changed = ctx.topology.subscribe();
    loop {
        // A master to track.
        let up = loop {
            if let Some(up) = ctx.current() {
                break up;
            }
            // No master: nothing may be served from the cache meanwhile.
            cache.store.flush(FlushReason::Topology);
            drain(&cache, &mut fills);
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = changed.changed() => {}
            }
        };
        let why = session(
            &ctx,
            &cache,
            &mut fills,
            &mut changed,
            up.generation,
            &up.node.settings,
        )
        .await;
        // On shutdown the cache is left as it is: the warm-up list is saved
        // from it, and nothing is served any more.
        let Some(why) = why else { return };
        let reason = if why == TOPOLOGY_CHANGED {
            FlushReason::Topology
        } else {
            FlushReason::Link
        };
        cache.store.flush(reason);
        drain(&cache, &mut fills);
        tracing::warn!(error = %why, "near cache: tracking link lost; cache flushed");
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Fills queued while the link is down are abandoned.
fn drain(cache: &NearCache, fills: &mut mpsc::Receiver<Fill>) {
    while let Ok(f) = fills.try_recv() {
        cache.store.abandon_fill(&f.request, f.ticket);
    }
}

/// Marks the link down however a session ends.
struct LinkDown<'a>(&'a NearCache);

impl Drop for LinkDown<'_> {
    fn drop(&mut self) {
        self.0
            .link_up
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// One tracking connection's life; `None` on shutdown, else why it ended.
async fn session(
    ctx: &Ctx,
    cache: &NearCache,
    fills: &mut mpsc::Receiver<Fill>,
    changed: &mut tokio::sync::watch::Receiver<u64>,
    generation: u64,
    settings: &connector::Settings,
) -> Option<String> {
    let mut stream = match connector::connect(settings, Proto::Resp3).await {
        Ok(s) => s,
        Err(e) => return Some(e.detail),
    };
    match connector::call(&mut stream, &[b"CLIENT", b"TRACKING", b"ON", b"OPTIN"]).await {
        Ok(r) if r.starts_with(b"+OK") => {}
        Ok(r) => {
            return Some(format!(
                "CLIENT TRACKING refused: {}",
                String::from_utf8_lossy(&r).trim_end()
            ))
        }
        Err(e) => return Some(e.detail),
    }
    // Invalidations may have been missed while there was no link.
    cache.store.flush(FlushReason::Start);
    cache
        .link_up
        .store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(master = %settings.address, "near cache: tracking link up");
    let _down = LinkDown(cache);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = Scanner::new();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let ping = Duration::from_millis(cache.config.ping_ms);
    let mut tick = tokio::time::interval(ping);
    let mut hot = ctx.hotkeys.as_ref().map(|d| d.subscribe());
    loop {
        // A client waits for the link to sync (see `NearCache::want_sync`):
        // a PING, unless one is on its way; once it is answered, every
        // invalidation queued before it has been applied.
        if cache.sync_wanted.load(std::sync::atomic::Ordering::Acquire)
            && !pending.iter().any(|p| matches!(p, Pending::Ping(_)))
        {
            cache
                .sync_wanted
                .store(false, std::sync::atomic::Ordering::Release);
            let mut out = BytesMut::new();
            reply::command(&mut out, &[b"PING"]);
            if let Err(e) = wr.write_all(&out).await {
                return Some(e.to_string());
            }
            pending.push_back(Pending::Ping(Instant::now()));
        }
        let hot_changed = async {
            match &mut hot {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return None,
            _ = cache.sync.notified() => {}
            _ = changed.changed() => {
                if ctx.current().map(|u| u.generation) != Some(generation) {
                    return Some(TOPOLOGY_CHANGED.into());
                }
            }
            true = hot_changed => {
                // Keys that stopped being hot are dropped.
                if let Some(d) = &ctx.hotkeys {
                    cache.store.retain_keys(|k| d.is_hot(k));
                }
            }
            _ = tick.tick() => {
                if pending.iter().any(|p| matches!(p, Pending::Ping(at) if at.elapsed() > ping)) {
                    return Some(format!("no pong within {} ms (cache.ping_ms)", ping.as_millis()));
                }
                let mut out = BytesMut::new();
                reply::command(&mut out, &[b"PING"]);
                if let Err(e) = wr.write_all(&out).await {
                    return Some(e.to_string());
                }
                pending.push_back(Pending::Ping(Instant::now()));
            }
            Some(fill) = fills.recv() => {
                // A fill taken after the master was fenced or replaced (and
                // the cache flushed) must not read the old master: this
                // link's session ends and the next one serves the fills.
                let installed = ctx.upstream.load().as_ref().map(|u| u.generation);
                if installed != Some(generation) {
                    cache.store.abandon_fill(&fill.request, fill.ticket);
                    return Some(TOPOLOGY_CHANGED.into());
                }
                let mut out = BytesMut::new();
                reply::command(&mut out, &[b"CLIENT", b"CACHING", b"YES"]);
                reply::command(&mut out, &[b"MULTI"]);
                if fill.selects {
                    out.extend_from_slice(&fill.request);
                    reply::command(&mut out, &[b"PTTL", &fill.key]);
                    reply::command(&mut out, &[b"SELECT", b"0"]);
                } else {
                    reply::command(&mut out, &[b"PTTL", &fill.key]);
                    out.extend_from_slice(&fill.request);
                }
                reply::command(&mut out, &[b"EXEC"]);
                if let Err(e) = wr.write_all(&out).await {
                    cache.store.abandon_fill(&fill.request, fill.ticket);
                    return Some(e.to_string());
                }
                pending.push_back(Pending::Fill(fill, 0, Instant::now()));
            }
            r = rd.read_buf(&mut buf) => {
                match r {
                    Ok(0) => return Some("connection closed by upstream".into()),
                    Err(e) => return Some(e.to_string()),
                    Ok(_) => {}
                }
                loop {
                    let end = match scanner.next(&buf) {
                        Ok(Some(end)) => end,
                        Ok(None) => break,
                        Err(e) => return Some(e.to_string()),
                    };
                    let frame = buf.split_to(end).freeze();
                    scanner.consumed(end);
                    if let Err(e) = on_frame(cache, &mut pending, frame) {
                        return Some(e.detail);
                    }
                }
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(16 * 1024);
                }
            }
        }
    }
}

/// Apply one frame from the tracking connection, in wire order.
fn on_frame(cache: &NearCache, pending: &mut VecDeque<Pending>, frame: Bytes) -> Result<(), Error> {
    if frame.first() == Some(&b'>') {
        let mut parts = elements(&frame);
        let kind = parts.next().and_then(string_of).unwrap_or_default();
        match kind {
            b"invalidate" => match parts.next() {
                Some(keys) if keys.first() == Some(&b'*') => {
                    for k in elements(keys).filter_map(string_of) {
                        cache.store.invalidate(k);
                    }
                }
                // A null invalidation: FLUSHALL/FLUSHDB.
                _ => cache.store.flush(FlushReason::Flushall),
            },
            b"tracking-redir-broken" => {
                return Err(Error::upstream(Kind::Protocol, "tracking-redir-broken"));
            }
            _ => {}
        }
        return Ok(());
    }
    match pending.front_mut() {
        Some(Pending::Ping(at)) => {
            cache.store.synced(*at);
            pending.pop_front();
        }
        Some(Pending::Fill(fill, seen, _)) => {
            *seen += 1;
            if *seen == fill.replies() {
                let Some(Pending::Fill(fill, _, sent)) = pending.pop_front() else {
                    unreachable!()
                };
                land(cache, fill, &frame);
                cache.store.synced(sent);
            }
        }
        None => {
            return Err(Error::upstream(
                Kind::Protocol,
                "reply with no request on the tracking link",
            ))
        }
    }
    Ok(())
}

/// The EXEC reply of a fill: `*2` [PTTL, the command's reply], or in
/// another database `*4` [+OK, the command's reply, PTTL, +OK].
fn land(cache: &NearCache, fill: Fill, exec: &Bytes) {
    let mut parts = elements(exec);
    let parts = match fill.selects {
        // A SELECT that failed (the database is gone) ran the command in
        // database 0: nothing to cache.
        true => match (parts.next(), parts.next(), parts.next()) {
            (Some(b"+OK\r\n"), Some(reply), Some(pttl)) => Some((pttl, reply)),
            _ => None,
        },
        false => parts.next().zip(parts.next()),
    };
    let (Some((pttl, reply)), true) = (parts, exec.first() == Some(&b'*')) else {
        cache.store.abandon_fill(&fill.request, fill.ticket);
        return;
    };
    let pttl = parse_int(&pttl[1..pttl.len() - 2]).unwrap_or(-2);
    let max = Duration::from_millis(cache.config.max_ttl_ms);
    // Up to 10% jitter below the bound, so entries filled together do not
    // all expire (and refill) together.
    let bound = max - max.mul_f64(rand::random::<f64>() * 0.1);
    let ttl = if pttl >= 0 {
        Duration::from_millis(pttl as u64).min(bound)
    } else {
        bound
    };
    // Errors are not cached (LOADING, OOM, ... pass), except WRONGTYPE:
    // it follows from the key's type, which only a write (an
    // invalidation) can change, and MGET needs it to answer per key.
    let error = matches!(reply.first(), Some(b'-' | b'!')) && !wrongtype(reply);
    if error || reply.len() > cache.config.max_reply_bytes {
        if !error {
            crate::metrics::Limit::CacheMaxReplyBytes.reached();
        }
        cache.store.abandon_fill(&fill.request, fill.ticket);
        return;
    }
    let offset = reply.as_ptr() as usize - exec.as_ptr() as usize;
    let reply = exec.slice(offset..offset + reply.len());
    cache
        .store
        .complete_fill(fill.key, fill.request, fill.ticket, reply, ttl);
}

/// A `-WRONGTYPE` error reply (RESP2/RESP3 simple error).
fn wrongtype(reply: &[u8]) -> bool {
    reply.starts_with(b"-WRONGTYPE ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_parsing() {
        let push = b">2\r\n$10\r\ninvalidate\r\n*2\r\n$1\r\na\r\n$2\r\nbb\r\n";
        let parts: Vec<&[u8]> = elements(push).collect();
        assert_eq!(string_of(parts[0]), Some(&b"invalidate"[..]));
        let keys: Vec<&[u8]> = elements(parts[1]).filter_map(string_of).collect();
        assert_eq!(keys, vec![&b"a"[..], &b"bb"[..]]);
        let exec = b"*2\r\n:1500\r\n$3\r\nval\r\n";
        let parts: Vec<&[u8]> = elements(exec).collect();
        assert_eq!(parts, vec![&b":1500\r\n"[..], &b"$3\r\nval\r\n"[..]]);
        assert!(wrongtype(
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
        ));
        assert!(!wrongtype(
            b"-LOADING Redis is loading the dataset in memory\r\n"
        ));
    }
}
