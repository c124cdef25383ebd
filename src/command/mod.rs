//! Commands: the table learned from the upstream's `COMMAND` reply and the
//! routing families built on it.

pub mod class;
pub mod keys;
pub mod table;

pub use class::{classify, Class, ReplyMode, SubKind};
pub use table::{CommandInfo, CommandTable};
