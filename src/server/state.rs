//! Per-connection state that decides whether a client needs its own upstream
//! connection, tracked as requests are dispatched.
//!
//! Redis runs one connection's commands in order, so the effect of each
//! stateful command can be applied when it is sent rather than when its
//! reply comes back. Where the outcome is uncertain (a SELECT to a database
//! that may not exist) the tracking errs on the side of staying pinned, which
//! costs a connection but never mixes state into the shared pool.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

use crate::command::{ReplyMode, SubKind};

#[derive(Debug, Default)]
pub struct SessionState {
    pub db: i64,
    /// `db` is known to exist (checked against Redis's `databases`), so
    /// the shared pool of that database can serve the client.
    pub db_checked: bool,
    /// A SELECT queued in MULTI may or may not have run (DISCARD,
    /// EXECABORT, a failed WATCH): `db` is a guess until the next SELECT
    /// outside MULTI, so the connection is neither given back nor carried.
    pub db_uncertain: bool,
    /// (UN)SUBSCRIBEs queued in the open MULTI: they run at EXEC, if it
    /// runs (see `exec_pubsub`).
    queued: Vec<Queued>,
    pub in_multi: bool,
    pub watching: bool,
    pub monitor: bool,
    /// CLIENT SETNAME / TRACKING / NO-EVICT ... : kept until RESET.
    pub client_state: bool,
    pub reply_off: bool,
    pub reply_skip: bool,
    pub channels: HashSet<Bytes>,
    pub patterns: HashSet<Bytes>,
    pub shard_channels: HashSet<Bytes>,
    /// SUBSCRIBEs sent whose first reply has not come: Redis refuses one
    /// as a whole when the ACL denies any of its channels (`-NOPERM`), and
    /// the names it added then go again (see `settle`).
    unconfirmed: VecDeque<Unconfirmed>,
    next_subscribe: u64,
}

/// See `SessionState::unconfirmed`.
#[derive(Debug)]
struct Unconfirmed {
    id: u64,
    what: What,
}

#[derive(Debug)]
enum What {
    Subscribe {
        kind: SubKind,
        /// The names it added (not subscribed before, or added by an
        /// earlier request not yet settled).
        fresh: Vec<Bytes>,
        /// All its names.
        names: Vec<Bytes>,
    },
    /// An EXEC that runs queued (UN)SUBSCRIBEs, applied as if it ran: the
    /// subscriptions before it, to go back to if it did not.
    Exec(Box<[HashSet<Bytes>; 3]>),
}

/// An (UN)SUBSCRIBE queued in MULTI.
#[derive(Debug)]
struct Queued {
    subscribe: bool,
    kind: SubKind,
    names: Vec<Bytes>,
}

impl SessionState {
    /// True when nothing ties the client to its pinned connection.
    pub fn clean(&self) -> bool {
        self.no_connection_state() && !self.subscribed()
    }

    /// The state is all keyward can make again on a new connection: the
    /// database (SELECT), subscriptions (SUBSCRIBE again) and a CLIENT
    /// REPLY SKIP not yet spent, or nothing, so it can be carried to a new
    /// master.
    pub fn carryable(&self) -> bool {
        !self.db_uncertain
            && !self.in_multi
            && !self.watching
            && !self.monitor
            && !self.client_state
            && !self.reply_off
    }

    /// Nothing but (possibly) subscriptions ties the client to its
    /// connection: a database Redis has is served by its shared pool.
    fn no_connection_state(&self) -> bool {
        (self.db == 0 || self.db_checked) && !self.reply_skip && self.carryable()
    }

    pub fn subs(&mut self, kind: SubKind) -> &mut HashSet<Bytes> {
        match kind {
            SubKind::Channel => &mut self.channels,
            SubKind::Pattern => &mut self.patterns,
            SubKind::Shard => &mut self.shard_channels,
        }
    }

    pub fn subscribed(&self) -> bool {
        !(self.channels.is_empty() && self.patterns.is_empty() && self.shard_channels.is_empty())
    }

    /// Replies the next request will get, given CLIENT REPLY, and advance SKIP.
    pub fn replies_for_next(&mut self) -> u64 {
        if self.reply_off {
            0
        } else if self.reply_skip {
            self.reply_skip = false;
            0
        } else {
            1
        }
    }

    /// Apply CLIENT REPLY; returns the replies that command itself gets.
    pub fn set_reply_mode(&mut self, mode: ReplyMode) -> u64 {
        match mode {
            ReplyMode::On => {
                self.reply_off = false;
                self.reply_skip = false;
                1
            }
            ReplyMode::Off => {
                // A SKIP in force is spent on this command itself.
                self.reply_off = true;
                self.reply_skip = false;
                0
            }
            ReplyMode::Skip => {
                if !self.reply_off {
                    self.reply_skip = true;
                }
                0
            }
        }
    }

    /// Apply SUBSCRIBE with `names`; returns the replies Redis sends and
    /// the id to report its outcome to `settle` with. None under CLIENT
    /// REPLY OFF or SKIP: a refusal is then silent, so no reply settles it
    /// (the names stay, as before this bookkeeping).
    pub fn subscribe(&mut self, kind: SubKind, names: &[Bytes]) -> (u64, Option<u64>) {
        let silent = self.reply_off || self.reply_skip;
        let set = self.subs(kind);
        let mut fresh = Vec::new();
        for n in names {
            if set.insert(n.clone()) {
                fresh.push(n.clone());
            }
        }
        let id = (!silent).then(|| {
            self.unconfirm(What::Subscribe {
                kind,
                fresh,
                names: names.to_vec(),
            })
        });
        // Redis answers once per argument; with none, one arity error.
        (self.silenced(names.len().max(1) as u64), id)
    }

    fn unconfirm(&mut self, what: What) -> u64 {
        self.next_subscribe += 1;
        let id = self.next_subscribe;
        self.unconfirmed.push_back(Unconfirmed { id, what });
        id
    }

    /// SUBSCRIBEs whose outcome is not known yet: the subscriptions are
    /// what they say only once they are settled.
    pub fn unsettled(&self) -> bool {
        !self.unconfirmed.is_empty()
    }

    /// An EXEC that ran (UN)SUBSCRIBEs is not settled yet: until it is,
    /// not even a SUBSCRIBE can be counted on.
    pub fn exec_unsettled(&self) -> bool {
        self.unconfirmed
            .iter()
            .any(|u| matches!(u.what, What::Exec(_)))
    }

    /// Queue an (UN)SUBSCRIBE sent inside MULTI.
    pub fn queue_pubsub(&mut self, subscribe: bool, kind: SubKind, names: &[Bytes]) {
        self.queued.push(Queued {
            subscribe,
            kind,
            names: names.to_vec(),
        });
    }

    pub fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }

    /// The transaction ended without running its queued commands (DISCARD,
    /// a refused EXEC).
    pub fn drop_queued(&mut self) {
        self.queued.clear();
    }

    /// EXEC of a transaction that queued (UN)SUBSCRIBEs, its reply not
    /// silenced: apply them as if it runs, and return the confirmations
    /// Redis then sends after EXEC's array (each (UN)SUBSCRIBE is one
    /// element of it, its confirmations past the first follow it) and the
    /// id to settle it under: refused (EXECABORT, a failed WATCH), it
    /// ran nothing and the subscriptions go back. None without any queued.
    pub fn exec_pubsub(&mut self) -> Option<(u64, u64)> {
        if self.queued.is_empty() {
            return None;
        }
        let before = Box::new([
            self.channels.clone(),
            self.patterns.clone(),
            self.shard_channels.clone(),
        ]);
        let mut extras = 0;
        for q in std::mem::take(&mut self.queued) {
            if q.kind == SubKind::Shard {
                // Redis 7.0 refuses (S)SUBSCRIBE to shard channels inside
                // MULTI when EXEC runs it ("isn't allowed for a DENY
                // BLOCKING client"): one error, no change.
                continue;
            }
            let set = self.subs(q.kind);
            let n = if q.subscribe {
                set.extend(q.names.iter().cloned());
                q.names.len() as u64
            } else {
                unsubscribe_from(set, &q.names)
            };
            extras += n.saturating_sub(1);
        }
        Some((extras, self.unconfirm(What::Exec(before))))
    }

    /// Apply Redis's answers to SUBSCRIBEs (and EXECs that ran some), in
    /// order: (id, refused).
    pub fn settle(&mut self, settled: &[(u64, bool)]) {
        for &(id, refused) in settled {
            while self.unconfirmed.front().is_some_and(|u| u.id < id) {
                self.unconfirmed.pop_front();
            }
            if self.unconfirmed.front().is_none_or(|u| u.id != id) {
                continue;
            }
            let u = self.unconfirmed.pop_front().expect("checked");
            match (u.what, refused) {
                (_, false) => {}
                // Nothing is sent behind such an EXEC before it settles.
                (What::Exec(before), true) => {
                    let [c, p, s] = *before;
                    (self.channels, self.patterns, self.shard_channels) = (c, p, s);
                }
                (What::Subscribe { kind, fresh, .. }, true) => {
                    for n in fresh {
                        // A later SUBSCRIBE of the name, sent while this
                        // one was unsettled, did not count it as its own:
                        // whether it stays is now up to that one.
                        let later = self.unconfirmed.iter_mut().find_map(|l| match &mut l.what {
                            What::Subscribe {
                                kind: k,
                                fresh,
                                names,
                            } if *k == kind && names.contains(&n) => Some(fresh),
                            _ => None,
                        });
                        match later {
                            Some(fresh) if !fresh.contains(&n) => fresh.push(n),
                            Some(_) => {}
                            None => {
                                self.subs(kind).remove(&n);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The `n` confirmations of an (UN)SUBSCRIBE: Redis sends them whatever
    /// CLIENT REPLY says (they go out as pushes), and a SKIP is spent on
    /// this command.
    fn silenced(&mut self, n: u64) -> u64 {
        self.reply_skip = false;
        n
    }

    pub fn unsubscribe(&mut self, kind: SubKind, names: &[Bytes]) -> u64 {
        let n = unsubscribe_from(self.subs(kind), names);
        self.silenced(n)
    }
}

/// Apply an UNSUBSCRIBE of `names` (all, when none) to `set`; the
/// confirmations Redis sends for it (one, with a null name, when there
/// was nothing to end).
fn unsubscribe_from(set: &mut HashSet<Bytes>, names: &[Bytes]) -> u64 {
    if names.is_empty() {
        let n = set.len().max(1) as u64;
        set.clear();
        n
    } else {
        for n in names {
            set.remove(n);
        }
        names.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_reply_counts() {
        let mut s = SessionState::default();
        let a = Bytes::from_static(b"a");
        let b = Bytes::from_static(b"b");
        assert_eq!(
            s.subscribe(SubKind::Channel, &[a.clone(), b.clone(), a.clone()])
                .0,
            3
        );
        assert!(!s.clean());
        assert_eq!(s.unsubscribe(SubKind::Channel, &[]), 2);
        assert!(s.clean());
        assert_eq!(s.unsubscribe(SubKind::Pattern, &[]), 1);
    }

    #[test]
    fn client_reply_does_not_silence_subscription_confirmations() {
        let mut s = SessionState::default();
        let a = Bytes::from_static(b"a");
        let b = Bytes::from_static(b"b");
        s.set_reply_mode(ReplyMode::Skip);
        assert_eq!(
            s.subscribe(SubKind::Channel, &[a.clone(), b.clone()]),
            (2, None)
        );
        assert!(!s.unsettled());
        // The SKIP was spent on SUBSCRIBE.
        assert_eq!(s.replies_for_next(), 1);
        s.set_reply_mode(ReplyMode::Off);
        assert_eq!(s.unsubscribe(SubKind::Channel, &[]), 2);
        assert!(!s.subscribed());
    }

    #[test]
    fn a_refused_subscribe_takes_back_only_what_it_added() {
        let mut s = SessionState::default();
        let a = Bytes::from_static(b"a");
        let b = Bytes::from_static(b"b");
        let (_, first) = s.subscribe(SubKind::Channel, std::slice::from_ref(&a));
        let (n, second) = s.subscribe(SubKind::Channel, &[a.clone(), b.clone()]);
        assert_eq!(n, 2);
        assert!(s.unsettled());
        s.settle(&[(first.unwrap(), false), (second.unwrap(), true)]);
        assert!(!s.unsettled());
        // `a` was subscribed before the refused request: it stays.
        assert!(s.channels.contains(&a) && !s.channels.contains(&b));
        let (_, third) = s.subscribe(SubKind::Pattern, std::slice::from_ref(&b));
        s.settle(&[(third.unwrap(), true)]);
        assert!(s.patterns.is_empty());
        assert_eq!(s.unsubscribe(SubKind::Channel, &[]), 1);
        assert!(s.clean());
    }

    #[test]
    fn a_name_an_unsettled_subscribe_added_is_up_to_a_later_one() {
        let mut s = SessionState::default();
        let a = Bytes::from_static(b"a");
        let b = Bytes::from_static(b"b");
        let c = Bytes::from_static(b"c");
        // Sent back to back: `b` is fresh only in the first.
        let (_, first) = s.subscribe(SubKind::Channel, &[a.clone(), b.clone()]);
        let (_, second) = s.subscribe(SubKind::Channel, std::slice::from_ref(&b));
        let (_, third) = s.subscribe(SubKind::Channel, std::slice::from_ref(&c));
        // The first refused: `b` stays, since the second subscribed it.
        s.settle(&[(first.unwrap(), true)]);
        assert!(!s.channels.contains(&a) && s.channels.contains(&b));
        // The second refused too: now `b` goes.
        s.settle(&[(second.unwrap(), true), (third.unwrap(), false)]);
        assert!(!s.unsettled());
        assert_eq!(s.channels, HashSet::from([c.clone()]));
        // A pattern of the same name is another namespace.
        let (_, p) = s.subscribe(SubKind::Pattern, std::slice::from_ref(&c));
        let (_, q) = s.subscribe(SubKind::Channel, std::slice::from_ref(&c));
        s.settle(&[(p.unwrap(), true), (q.unwrap(), false)]);
        assert!(s.patterns.is_empty() && s.channels.contains(&c));
    }

    #[test]
    fn an_exec_applies_its_queued_subscriptions_or_takes_them_back() {
        let mut s = SessionState::default();
        let [a, b, c] = [b"a", b"b", b"c"].map(|n| Bytes::from_static(n));
        let (_, id) = s.subscribe(SubKind::Channel, &[a.clone(), b.clone()]);
        s.settle(&[(id.unwrap(), false)]);
        assert_eq!(s.exec_pubsub(), None);
        // UNSUBSCRIBE (both: one more confirmation), PSUBSCRIBE c (none
        // more), SUBSCRIBE c a (one more).
        s.queue_pubsub(false, SubKind::Channel, &[]);
        s.queue_pubsub(true, SubKind::Pattern, std::slice::from_ref(&c));
        s.queue_pubsub(true, SubKind::Channel, &[c.clone(), a.clone()]);
        let (extras, id) = s.exec_pubsub().unwrap();
        assert_eq!(extras, 2);
        assert!(s.exec_unsettled() && !s.has_queued());
        assert_eq!(s.channels, HashSet::from([c.clone(), a.clone()]));
        // Aborted: back to before.
        s.settle(&[(id, true)]);
        assert!(!s.unsettled());
        assert_eq!(s.channels, HashSet::from([a.clone(), b.clone()]));
        assert!(s.patterns.is_empty());
        s.queue_pubsub(false, SubKind::Channel, std::slice::from_ref(&a));
        let (extras, id) = s.exec_pubsub().unwrap();
        s.settle(&[(id, false)]);
        assert_eq!((extras, s.channels.clone()), (0, HashSet::from([b])));
    }

    #[test]
    fn client_reply_modes() {
        let mut s = SessionState::default();
        assert_eq!(s.set_reply_mode(ReplyMode::Skip), 0);
        assert_eq!(s.replies_for_next(), 0);
        assert_eq!(s.replies_for_next(), 1);
        assert_eq!(s.set_reply_mode(ReplyMode::Off), 0);
        assert_eq!(s.replies_for_next(), 0);
        assert!(!s.clean());
        assert_eq!(s.set_reply_mode(ReplyMode::On), 1);
        assert!(s.clean());
    }
}
