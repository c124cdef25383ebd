//! Commands: the table learned from the upstream's `COMMAND` reply and the
//! routing families built on it.

pub mod class;
pub mod family;
pub mod keys;
pub mod table;

pub use class::{classify, Class, ReplyMode, Routed, SubKind};
pub use family::{Family, FAMILIES};
pub use table::{CommandInfo, CommandTable};
