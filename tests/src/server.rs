//! The world's web server (hidden `qubes-lab serve-http`): plain HTTP/1.0 on the given
//! addresses (the lab uses 198.18.0.10:80 and :443), a reply naming the address and port; and
//! TCP echo on the `--echo` addresses (198.18.0.10:8080), which keeps connections open for as
//! long as the client wants, for the rule-change tests. One thread per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use crate::cmd::{io_err, Error, Result};

fn http_conn(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && !req.windows(2).any(|w| w == b"\n\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        if req.len() > 16 * 1024 {
            break;
        }
    }
    let local = s
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_string());
    let body = format!("qubes-lab world: plain HTTP on {local}\n");
    let resp = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

fn echo_conn(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn accept_loop(l: TcpListener, handler: fn(TcpStream)) {
    for conn in l.incoming() {
        match conn {
            Ok(s) => {
                thread::spawn(move || handler(s));
            }
            Err(e) => {
                eprintln!("serve-http: accept: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Binds every address, creates `ready_file` (if given), then serves until killed.
pub fn serve(http: &[SocketAddr], echo: &[SocketAddr], ready_file: Option<&Path>) -> Result<()> {
    let mut listeners: Vec<(TcpListener, fn(TcpStream))> = Vec::new();
    for a in http {
        let l = TcpListener::bind(a).map_err(|e| Error(format!("bind {a}: {e}")))?;
        listeners.push((l, http_conn));
    }
    for a in echo {
        let l = TcpListener::bind(a).map_err(|e| Error(format!("bind {a}: {e}")))?;
        listeners.push((l, echo_conn));
    }
    if listeners.is_empty() {
        return Err(Error("serve-http: nothing to serve".to_string()));
    }
    for (l, _) in &listeners {
        if let Ok(a) = l.local_addr() {
            eprintln!("serve-http: listening on {a}");
        }
    }
    if let Some(p) = ready_file {
        std::fs::write(p, b"ready\n").map_err(io_err("cannot write", p))?;
    }
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|(l, h)| thread::spawn(move || accept_loop(l, h)))
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
