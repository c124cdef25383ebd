//! The failover timeline: what happened, and when, from the moment the
//! master stopped being healthy until traffic flowed to a verified master
//! again. Shown by `/topology` (the dashboard's failover panel) and counted
//! in `keyward_failovers_total`.

use serde::Serialize;

use super::State;

/// Events kept per failover; later ones are counted, not stored.
const MAX_EVENTS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub t_ms: u64,
    pub event: String,
}

/// One episode away from a healthy master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failover {
    pub from: Option<String>,
    pub to: Option<String>,
    pub started_ms: u64,
    /// None while it is still under way.
    pub ended_ms: Option<u64>,
    pub events: Vec<Event>,
    /// Events beyond MAX_EVENTS.
    pub events_dropped: u64,
}

#[derive(Debug, Default)]
pub struct Timeline {
    current: Option<Failover>,
    last: Option<Failover>,
    /// Episodes that ended on another master.
    pub failovers: u64,
}

impl Timeline {
    /// A published change from (`old_state`, `old_master`) to (`state`,
    /// `master`) at `now`, for `why`.
    pub fn change(
        &mut self,
        now: u64,
        old: (State, Option<&str>),
        new: (State, Option<&str>),
        why: &str,
    ) {
        if old.0 == new.0 && old.1 == new.1 {
            return;
        }
        let text = match (why.is_empty(), new.1) {
            (true, Some(m)) => format!("{} -> {} (master {m})", old.0.name(), new.0.name()),
            (true, None) => format!("{} -> {}", old.0.name(), new.0.name()),
            (false, Some(m)) => {
                format!("{} -> {} (master {m}): {why}", old.0.name(), new.0.name())
            }
            (false, None) => format!("{} -> {}: {why}", old.0.name(), new.0.name()),
        };
        if self.current.is_none() {
            if old.0 != State::Healthy {
                // Start-up discovery is not a failover.
                return;
            }
            self.current = Some(Failover {
                from: old.1.map(str::to_string),
                to: None,
                started_ms: now,
                ended_ms: None,
                events: Vec::new(),
                events_dropped: 0,
            });
        }
        let f = self.current.as_mut().expect("set above");
        if f.events.len() < MAX_EVENTS {
            f.events.push(Event {
                t_ms: now,
                event: text,
            });
        } else {
            f.events_dropped += 1;
        }
        if new.0 == State::Healthy {
            let mut f = self.current.take().expect("set above");
            f.to = new.1.map(str::to_string);
            f.ended_ms = Some(now);
            if f.to != f.from {
                self.failovers += 1;
            }
            self.last = Some(f);
        }
    }

    /// The episode under way, else the last one.
    pub fn latest(&self) -> Option<&Failover> {
        self.current.as_ref().or(self.last.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_an_episode() {
        let mut t = Timeline::default();
        t.change(
            1,
            (State::Discovering, None),
            (State::Healthy, Some("a:1")),
            "",
        );
        assert!(t.latest().is_none(), "discovery is not a failover");
        t.change(
            10,
            (State::Healthy, Some("a:1")),
            (State::Suspect, Some("a:1")),
            "+sdown",
        );
        t.change(
            20,
            (State::Suspect, Some("a:1")),
            (State::Fenced, Some("a:1")),
            "+odown",
        );
        let open = t.latest().unwrap();
        assert_eq!(open.ended_ms, None);
        t.change(
            30,
            (State::Fenced, Some("a:1")),
            (State::Healthy, Some("b:2")),
            "+switch-master",
        );
        let f = t.latest().unwrap();
        assert_eq!(
            (f.from.as_deref(), f.to.as_deref()),
            (Some("a:1"), Some("b:2"))
        );
        assert_eq!((f.started_ms, f.ended_ms), (10, Some(30)));
        assert_eq!(f.events.len(), 3);
        assert!(f.events[0].event.contains("+sdown"), "{:?}", f.events);
        assert_eq!(t.failovers, 1);
        // A suspicion that clears on the same master is no failover.
        t.change(
            40,
            (State::Healthy, Some("b:2")),
            (State::Suspect, Some("b:2")),
            "",
        );
        t.change(
            50,
            (State::Suspect, Some("b:2")),
            (State::Healthy, Some("b:2")),
            "",
        );
        assert_eq!(t.failovers, 1);
    }
}
