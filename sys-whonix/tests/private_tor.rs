//! The gateway's Tor client against a private Tor network (testkit::tornet: three authorities,
//! two middle relays and an exit, Debian's tor) in a network namespace the test creates: it
//! bootstraps with its progress reported and carries a TCP stream through the exit to a web
//! server on a world address (198.18.0.10, on the namespace's loopback). Nothing leaves the
//! namespace.
//!
//! The test runs itself again inside the namespace (`ip netns exec`), where the network and
//! the client live.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sys_whonix::tor::{FallbackCache, Network, Tor, TorSettings};
use testkit::tornet::TorNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "the_tor_client_bootstraps_and_carries_a_stream_on_a_private_network";
const BODY: &str = "hello from the world";

#[test]
fn the_tor_client_bootstraps_and_carries_a_stream_on_a_private_network() {
    if let Some(ns) = testkit::netns_child() {
        child(&ns);
        return;
    }
    if !TorNet::can_run(NAME) {
        return;
    }
    // The network's tor processes live in the namespace; the child's TorNet kills them
    // before the namespace goes.
    testkit::run_in_own_netns(
        NAME,
        "swtor",
        &[
            &["-n", "{ns}", "link", "set", "lo", "up"],
            &["-n", "{ns}", "addr", "add", "198.18.0.10/32", "dev", "lo"],
        ],
    );
}

/// A tiny web server on the world address: one response per connection.
fn serve_http() {
    let listener = std::net::TcpListener::bind("198.18.0.10:80").expect("bind 198.18.0.10:80");
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{BODY}",
                BODY.len()
            );
        }
    });
}

fn child(ns: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    serve_http();
    let net = TorNet::start(&dir.path().join("net"), ns).expect("start the private network");
    net.wait_consensus(Duration::from_secs(120))
        .expect("the network's first consensus");
    let settings = TorSettings {
        state_dir: dir.path().join("arti/state"),
        cache_dir: dir.path().join("arti/cache"),
        network: Network::Private {
            authorities: net.authorities.clone(),
            fallbacks: net
                .fallbacks
                .iter()
                .map(|f| FallbackCache {
                    rsa_identity: f.rsa_identity.clone(),
                    ed_identity: f.ed_identity.clone(),
                    orport: f.orport.clone(),
                })
                .collect(),
        },
        trust_storage_permissions: true,
    };
    let progress = Arc::new(Mutex::new(Vec::<String>::new()));
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let seen = progress.clone();
    let body = rt.block_on(async move {
        let tor = tokio::time::timeout(
            Duration::from_secs(120),
            Tor::bootstrap(&settings, move |s| {
                eprintln!("bootstrap: {s}");
                seen.lock().expect("lock").push(s);
            }),
        )
        .await
        .expect("bootstrap within 120 s")
        .expect("bootstrap");
        eprintln!("status: {}", tor.status());
        let isolation = arti_client::IsolationToken::new();
        // A network seconds old: its exit may still turn the first streams away (END MISC
        // while it settles), as a client on a real network sees now and then; a client
        // tries again, and so does the test, for up to a minute.
        let mut attempt = 0;
        let mut stream = loop {
            attempt += 1;
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                tor.connect("198.18.0.10:80".parse().expect("addr"), isolation),
            )
            .await;
            match r {
                Ok(Ok(s)) => break s,
                Ok(Err(e)) if attempt < 12 => eprintln!("attempt {attempt}: {e}"),
                Err(_) if attempt < 12 => eprintln!("attempt {attempt}: timed out"),
                other => panic!("no stream through the exit after {attempt} attempts: {other:?}"),
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        stream
            .write_all(b"GET / HTTP/1.0\r\nHost: 198.18.0.10\r\n\r\n")
            .await
            .expect("write");
        stream.flush().await.expect("flush");
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.expect("read");
        String::from_utf8_lossy(&got).into_owned()
    });
    assert!(body.ends_with(BODY), "through Tor: {body:?}");
    let p = progress.lock().expect("lock");
    assert!(!p.is_empty(), "no bootstrap progress was reported");
    drop(net);
}
