//! A deliberately tiny HTTP/1.1 client for keyward's admin endpoint, on a
//! raw std socket so tests need no HTTP client dependency.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::resp::esc;
use super::DEADLINE;

/// `GET path` on 127.0.0.1:`port`; returns (status code, body as text).
/// Panics on connection failure, timeout (10 s) or an unparsable response.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_request(port, "GET", path, None)
}

/// `POST path` with `body`; returns (status code, body as text).
pub fn http_post(port: u16, path: &str, body: &[u8]) -> (u16, String) {
    http_request(port, "POST", path, Some(body))
}

/// One request with `Connection: close`, so the response ends at EOF and no
/// keep-alive state is involved. Handles both `Content-Length` and chunked
/// response bodies.
pub fn http_request(port: u16, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, DEADLINE)
        .unwrap_or_else(|e| panic!("http {method} {path}: connect to {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE))
        .expect("set_read_timeout");
    s.set_write_timeout(Some(DEADLINE))
        .expect("set_write_timeout");

    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Length: {}\r\nContent-Type: application/octet-stream\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    s.write_all(&bytes)
        .unwrap_or_else(|e| panic!("http {method} {path}: write to {addr}: {e}"));

    // The read timeout applies per read, so a trickling server could exceed
    // 10 s in total; acceptable for an admin endpoint serving small bodies.
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap_or_else(|e| {
        panic!(
            "http {method} {path}: read from {addr}: {e}; got so far: {}",
            esc(&resp)
        )
    });
    parse_response(&resp)
        .unwrap_or_else(|e| panic!("http {method} {path}: {e}; raw response: {}", esc(&resp)))
}

fn parse_response(resp: &[u8]) -> Result<(u16, String), String> {
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&resp[..head_end]).map_err(|_| "non-UTF-8 headers")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;

    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad content-length {value:?}"))?,
            );
        } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }

    let raw_body = &resp[head_end + 4..];
    let body = if chunked {
        dechunk(raw_body)?
    } else if let Some(n) = content_length {
        raw_body
            .get(..n)
            .ok_or_else(|| format!("body shorter than content-length {n}"))?
            .to_vec()
    } else {
        raw_body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("unterminated chunk size")?;
        let size_text = std::str::from_utf8(&b[..eol]).map_err(|_| "bad chunk size")?;
        // Chunk extensions (";name=value") are allowed after the size.
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out); // trailers, if any, are ignored
        }
        let data = b.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(data);
        b = b.get(size + 2..).ok_or("truncated chunk terminator")?;
    }
}
