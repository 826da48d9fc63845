//! The connectivity matrix: from every qube that provides no network, what it reaches, checked
//! live with short timeouts (probes run in parallel inside the qubes' namespaces).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Instant;

use crate::cmd::{Cmd, Result};
use crate::netvm::self_exe;
use crate::probe::Outcome;
use crate::topology::world::{WEB_IP, WEB_NAME};
use crate::topology::{Qube, Topology, VIRTUAL_DNS};

/// Probe timeout for the matrix.
pub const TIMEOUT_MS: u64 = 1000;
/// Probe timeout for qubes behind sys-whonix: a stream's first use of an exit circuit, or
/// one Tor has to build, takes more than a second on a busy machine.
pub const TOR_TIMEOUT_MS: u64 = 10_000;

/// One cell: reached or not, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub reached: bool,
    pub text: String,
}

/// One row: a qube and its cells, in [`COLUMNS`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub qube: String,
    pub cells: Vec<Cell>,
}

pub const COLUMNS: [&str; 5] = [
    "ping 198.18.0.10",
    "dns web.test",
    "http :80",
    "https-port :443",
    "other qube tcp",
];

fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// A probe's outcome as a cell.
fn cell_of(o: &Outcome, what_ok: &str) -> Cell {
    if o.ok() {
        let what = if what_ok.is_empty() {
            o.detail.clone()
        } else {
            what_ok.to_string()
        };
        let text = if what.is_empty() {
            format!("✓ ({})", fmt_ms(o.ms))
        } else {
            format!("✓ {what} ({})", fmt_ms(o.ms))
        };
        return Cell {
            reached: true,
            text,
        };
    }
    let why = match o.status.as_str() {
        "timeout" => "timeout".to_string(),
        "unreachable" => o.detail.clone(),
        "rejected" => o.detail.split(" from ").next().unwrap_or("").to_string(),
        "refused" => format!("refused, {}", o.detail),
        _ => o.detail.clone(),
    };
    Cell {
        reached: false,
        text: format!("✗ {why} ({})", fmt_ms(o.ms)),
    }
}

fn run_probe(ns: &str, exe: &Path, args: &[String]) -> Outcome {
    let started = Instant::now();
    let out = Cmd::in_ns(ns, exe).arg("probe").args(args).output(None);
    let fail = |detail: String| Outcome {
        status: "error".into(),
        ms: started.elapsed().as_secs_f64() * 1000.0,
        detail,
    };
    match out {
        Ok(o) => {
            let stdout = String::from_utf8_lossy(&o.stdout);
            Outcome::parse(stdout.lines().next().unwrap_or("")).unwrap_or_else(|| {
                fail(format!(
                    "probe failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            })
        }
        Err(e) => fail(e.to_string()),
    }
}

/// `ping -c1 -W1 -n ADDR`, read as a cell: the time, or what came back instead.
fn ping_cell(ns: &str, addr: Ipv4Addr) -> Cell {
    let started = Instant::now();
    let out = Cmd::in_ns(ns, "ping")
        .args(["-c1", "-W1", "-n", &addr.to_string()])
        .output(None);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let Ok(out) = out else {
        return Cell {
            reached: false,
            text: "✗ cannot run ping".into(),
        };
    };
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        let rtt = text
            .split("time=")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse::<f64>().ok());
        return Cell {
            reached: true,
            text: format!("✓ ({})", fmt_ms(rtt.unwrap_or(ms))),
        };
    }
    let why = if let Some(line) = text.lines().find(|l| l.starts_with("From ")) {
        // `From 10.137.0.6 icmp_seq=1 Packet filtered`
        let msg = line.splitn(4, ' ').nth(3).unwrap_or(line).trim();
        match msg {
            "Packet filtered" => "icmp admin-prohibited".to_string(),
            "Destination Host Prohibited" => "icmp host-prohibited".to_string(),
            "Destination Net Prohibited" => "icmp net-prohibited".to_string(),
            other => format!("icmp {}", other.to_lowercase()),
        }
    } else if text.contains("Network is unreachable") {
        "no route".to_string()
    } else {
        "timeout".to_string()
    };
    // ping reports no time for a failure; the wall time around it is mostly process start-up.
    let _ = ms;
    Cell {
        reached: false,
        text: format!("✗ {why}"),
    }
}

/// The other qube a row's last column tries to reach: the first other end qube with an
/// address.
fn other_qube<'a>(topo: &'a Topology, q: &Qube) -> Option<&'a Qube> {
    topo.end_qubes()
        .find(|o| o.name != q.name && o.ip.is_some() && o.running)
}

fn row(topo: &Topology, q: &Qube, exe: &Path) -> Row {
    if !q.running {
        let halted = Cell {
            reached: false,
            text: "✗ halted".into(),
        };
        return Row {
            qube: q.name.clone(),
            cells: vec![halted; COLUMNS.len()],
        };
    }
    let tor = topo.behind_whonix(q);
    let t = if tor { TOR_TIMEOUT_MS } else { TIMEOUT_MS }.to_string();
    let web = |port: u16| {
        vec![
            "tcp".to_string(),
            format!("{WEB_IP}:{port}"),
            "--http".to_string(),
            "--timeout-ms".to_string(),
            t.clone(),
        ]
    };
    let dns_args = vec![
        "dns".to_string(),
        WEB_NAME.to_string(),
        "--server".to_string(),
        VIRTUAL_DNS[0].to_string(),
        "--timeout-ms".to_string(),
        t.clone(),
    ];
    let other = other_qube(topo, q);
    let (ping, dns, http, https, other_cell) = std::thread::scope(|s| {
        let ping = s.spawn(|| ping_cell(&q.ns, WEB_IP));
        let dns = s.spawn(|| {
            let o = run_probe(&q.ns, exe, &dns_args);
            cell_of(&o, "")
        });
        let http = s.spawn(|| cell_of(&run_probe(&q.ns, exe, &web(80)), "200"));
        let https = s.spawn(|| cell_of(&run_probe(&q.ns, exe, &web(443)), "200"));
        let other_cell = s.spawn(|| match other.and_then(|o| o.ip.map(|ip| (o, ip))) {
            None => Cell {
                reached: false,
                text: "- (no other qube)".into(),
            },
            Some((o, ip)) => {
                let out = run_probe(
                    &q.ns,
                    exe,
                    &[
                        "tcp".to_string(),
                        format!("{ip}:80"),
                        "--timeout-ms".to_string(),
                        t.clone(),
                    ],
                );
                // A reset also means the packet got there; except behind sys-whonix, which
                // answers every connection to a private address with a reset itself.
                let reset = out.status == "refused" && out.detail == "tcp reset";
                let reached = out.ok() || reset && !tor;
                let mut c = cell_of(&out, "");
                c.reached = reached;
                let mark = if reached { "✓" } else { "✗" };
                let rest = c.text.split_once(' ').map(|x| x.1).unwrap_or("");
                let rest = if reset && tor {
                    rest.replacen("refused,", "refused by sys-whonix,", 1)
                } else {
                    rest.to_string()
                };
                c.text = format!("{mark} {}: {rest}", o.name);
                c
            }
        });
        let join = |h: std::thread::ScopedJoinHandle<'_, Cell>| {
            h.join().unwrap_or_else(|_| Cell {
                reached: false,
                text: "✗ probe panicked".into(),
            })
        };
        (
            join(ping),
            join(dns),
            join(http),
            join(https),
            join(other_cell),
        )
    });
    Row {
        qube: q.name.clone(),
        cells: vec![ping, dns, http, https, other_cell],
    }
}

/// Checks every end qube, in parallel.
pub fn check(topo: &Topology) -> Result<Vec<Row>> {
    let exe = self_exe()?;
    let qubes: Vec<&Qube> = topo.end_qubes().collect();
    let rows = std::thread::scope(|s| {
        let handles: Vec<_> = qubes
            .iter()
            .map(|q| {
                let exe = &exe;
                s.spawn(move || row(topo, q, exe))
            })
            .collect();
        handles
            .into_iter()
            .zip(&qubes)
            .map(|(h, q)| {
                h.join().unwrap_or_else(|_| Row {
                    qube: q.name.clone(),
                    cells: Vec::new(),
                })
            })
            .collect()
    });
    Ok(rows)
}

/// The table, columns padded by characters (✓ and ✗ are one column wide).
pub fn render(rows: &[Row]) -> String {
    let mut table: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["qube".to_string()];
    header.extend(COLUMNS.iter().map(|c| c.to_string()));
    table.push(header);
    for r in rows {
        let mut line = vec![r.qube.clone()];
        line.extend(r.cells.iter().map(|c| c.text.clone()));
        table.push(line);
    }
    let ncol = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..ncol)
        .map(|i| {
            table
                .iter()
                .filter_map(|l| l.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &table {
        let mut s = String::new();
        for (i, c) in line.iter().enumerate() {
            s.push_str(c);
            if i + 1 < line.len() {
                let pad = widths[i] - c.chars().count() + 2;
                s.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_read_outcomes() {
        let o = |s: &str| Outcome::parse(s).expect("outcome");
        assert_eq!(
            cell_of(
                &o("rejected 0.31 icmp admin-prohibited from 10.137.0.6"),
                "200"
            )
            .text,
            "✗ icmp admin-prohibited (0.3 ms)"
        );
        assert_eq!(
            cell_of(&o("ok 0.52 http 200 OK"), "200").text,
            "✓ 200 (0.5 ms)"
        );
        assert_eq!(
            cell_of(&o("ok 1.04 198.18.0.10"), "").text,
            "✓ 198.18.0.10 (1.0 ms)"
        );
        assert_eq!(
            cell_of(&o("timeout 1000.2 no answer in 1000 ms"), "").text,
            "✗ timeout (1000 ms)"
        );
        assert_eq!(
            cell_of(&o("unreachable 0.01 no route"), "").text,
            "✗ no route (0.0 ms)"
        );
    }

    #[test]
    fn table_is_aligned() {
        let rows = vec![Row {
            qube: "work".into(),
            cells: vec![
                Cell {
                    reached: true,
                    text: "✓ (0.1 ms)".into(),
                };
                5
            ],
        }];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("qube  ping 198.18.0.10"));
        assert!(lines[1].starts_with("work  ✓ (0.1 ms)"));
    }
}
