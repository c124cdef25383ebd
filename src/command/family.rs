//! Command families: the bounded label keyward's request metrics use.
//!
//! A family is derived from the ACL categories the upstream reports for each
//! command in its `COMMAND` reply (`@string`, `@hash`, ...), so a module's
//! commands fall into a family without a keyward release. The label set is
//! fixed and small: never a command name a client made up.

/// The family of a command, for metrics and `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(u8)]
pub enum Family {
    String,
    Hash,
    List,
    Set,
    SortedSet,
    Stream,
    Bitmap,
    HyperLogLog,
    Geo,
    PubSub,
    Transaction,
    Scripting,
    Connection,
    Keyspace,
    Server,
    /// The KEYWARD admin commands, answered by keyward.
    Keyward,
    /// Unknown commands and ones with no telling category.
    #[default]
    Other,
}

/// Number of families (the size of per-family arrays).
pub const FAMILIES: usize = 17;

impl Family {
    pub const ALL: [Family; FAMILIES] = [
        Family::String,
        Family::Hash,
        Family::List,
        Family::Set,
        Family::SortedSet,
        Family::Stream,
        Family::Bitmap,
        Family::HyperLogLog,
        Family::Geo,
        Family::PubSub,
        Family::Transaction,
        Family::Scripting,
        Family::Connection,
        Family::Keyspace,
        Family::Server,
        Family::Keyward,
        Family::Other,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Family::String => "string",
            Family::Hash => "hash",
            Family::List => "list",
            Family::Set => "set",
            Family::SortedSet => "sortedset",
            Family::Stream => "stream",
            Family::Bitmap => "bitmap",
            Family::HyperLogLog => "hyperloglog",
            Family::Geo => "geo",
            Family::PubSub => "pubsub",
            Family::Transaction => "transaction",
            Family::Scripting => "scripting",
            Family::Connection => "connection",
            Family::Keyspace => "keyspace",
            Family::Server => "server",
            Family::Keyward => "keyward",
            Family::Other => "other",
        }
    }

    /// The family for a command's ACL categories (`@read`, `@string`, ...).
    /// A data type wins over `@keyspace`, which wins over `@admin` and
    /// `@dangerous` (server commands); `SORT` (`@set @sortedset @list`)
    /// counts as a list command.
    pub fn from_categories<'a>(categories: impl IntoIterator<Item = &'a [u8]>) -> Family {
        let mut best = Family::Other;
        let mut rank = u8::MAX;
        for c in categories {
            let c = c.strip_prefix(b"@").unwrap_or(c);
            let (f, r) = match c.to_ascii_lowercase().as_slice() {
                b"string" => (Family::String, 0),
                b"hash" => (Family::Hash, 1),
                b"list" => (Family::List, 2),
                b"set" => (Family::Set, 3),
                b"sortedset" => (Family::SortedSet, 4),
                b"stream" => (Family::Stream, 5),
                b"bitmap" => (Family::Bitmap, 6),
                b"hyperloglog" => (Family::HyperLogLog, 7),
                b"geo" => (Family::Geo, 8),
                b"pubsub" => (Family::PubSub, 9),
                b"transaction" => (Family::Transaction, 10),
                b"scripting" => (Family::Scripting, 11),
                b"connection" => (Family::Connection, 12),
                b"keyspace" => (Family::Keyspace, 13),
                b"admin" | b"dangerous" => (Family::Server, 14),
                _ => continue,
            };
            if r < rank {
                rank = r;
                best = f;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(cats: &[&str]) -> Family {
        Family::from_categories(cats.iter().map(|c| c.as_bytes()))
    }

    #[test]
    fn families_from_categories() {
        assert_eq!(of(&["@read", "@string", "@fast"]), Family::String);
        assert_eq!(
            of(&[
                "@write",
                "@set",
                "@sortedset",
                "@list",
                "@slow",
                "@dangerous"
            ]),
            Family::List
        );
        assert_eq!(
            of(&["@keyspace", "@write", "@slow", "@dangerous"]),
            Family::Keyspace
        );
        assert_eq!(of(&["@slow", "@dangerous"]), Family::Server);
        assert_eq!(of(&["@fast", "@connection"]), Family::Connection);
        assert_eq!(of(&["@write", "@bitmap", "@slow"]), Family::Bitmap);
        assert_eq!(of(&[]), Family::Other);
    }

    #[test]
    fn all_is_complete_and_ordered() {
        for (i, f) in Family::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
        }
        let names: std::collections::HashSet<_> = Family::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(names.len(), FAMILIES);
    }
}
