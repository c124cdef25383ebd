//! The admin side: an HTTP listener for health checks (and later metrics,
//! hot keys, topology and the dashboard).

pub mod commands;
pub mod http;
