//! Upstream connections: the handshake, the shared pipelined pool, and the
//! pinned connections for stateful clients.

pub mod conn;
pub mod connector;
pub mod generation;
pub mod meter;
pub mod parked;
pub mod pinned;
pub mod pool;
pub mod side;

pub use conn::{BatchError, BatchResult, Conn, Replies};
pub use connector::Settings;
pub use generation::Upstream;
pub use meter::Meter;
pub use pinned::{PinMsg, Pinned};
pub use pool::{Learned, Node, Pool, ServerFacts};
