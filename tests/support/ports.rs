//! Loopback port allocation for the servers the tests start.

use std::net::TcpListener;
use std::sync::Mutex;

/// Every port this test binary has handed out. Tests in one binary run in
/// parallel threads; without this, two of them could be given the same
/// just-released ephemeral port and one would then probe the other's server
/// and believe its own process is up.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A loopback TCP port that was free a moment ago: bind 127.0.0.1:0, read the
/// port the OS chose, release it.
///
/// The port can still be taken by another process before the caller binds it;
/// `Redis` and `Keyward` detect that ("address in use") and retry on a fresh
/// port. Never returns the same port twice within one test binary.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        // A panicking test may poison the lock; the Vec is still valid.
        let mut used = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
    panic!("free_port: the OS kept returning ports this test binary already used");
}
