//! A minimal DNS stub resolver for `dsthost` rules (RFC 1035): one question per query, A or
//! AAAA, over UDP through the engine's uplink from the firewall's own address.
//!
//! The firewall needs nothing more than "the addresses of this name and how long to trust
//! them", so this is a few message builders and a careful parser, not a resolver library.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const TYPE_CNAME: u16 = 5;
const CLASS_IN: u16 = 1;

/// Why an answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// Not an answer to our question (wrong id, not a response, other question).
    NotOurs,
    /// The server says the name does not exist or failed (RCODE, RFC 1035 4.1.1).
    Rcode(u8),
    /// Cut short or inconsistent.
    Malformed,
    /// The name cannot be put in a query (empty or over-long label, RFC 1035 2.3.4).
    BadName,
}

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsError::NotOurs => f.write_str("not an answer to our query"),
            DnsError::Rcode(3) => f.write_str("name does not exist (NXDOMAIN)"),
            DnsError::Rcode(r) => write!(f, "server error (RCODE {r})"),
            DnsError::Malformed => f.write_str("malformed answer"),
            DnsError::BadName => f.write_str("name cannot be looked up"),
        }
    }
}

fn encode_name(name: &str, out: &mut Vec<u8>) -> Result<(), DnsError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(DnsError::BadName);
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(DnsError::BadName);
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    Ok(())
}

/// A recursive query for `name` of `qtype` (RFC 1035 4.1).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, DnsError> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    encode_name(name, &mut q)?;
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(q)
}

/// Skips a (possibly compressed) name at `at`, returning the offset after it (RFC 1035 4.1.4).
fn skip_name(m: &[u8], mut at: usize) -> Result<usize, DnsError> {
    loop {
        let len = *m.get(at).ok_or(DnsError::Malformed)?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => {
                m.get(at + 1).ok_or(DnsError::Malformed)?;
                return Ok(at + 2);
            }
            l if l & 0xc0 == 0 => at += 1 + usize::from(l),
            _ => return Err(DnsError::Malformed),
        }
    }
}

/// The addresses and the smallest TTL in a response to `build_query(id, _, qtype)`. CNAME
/// chains are followed implicitly: every A/AAAA record in the answer section counts (a stub
/// resolver asking a recursive server gets the chain resolved).
pub fn parse_response(m: &[u8], id: u16, qtype: u16) -> Result<(Vec<IpAddr>, u32), DnsError> {
    if m.len() < 12 {
        return Err(DnsError::Malformed);
    }
    if u16::from_be_bytes([m[0], m[1]]) != id || m[2] & 0x80 == 0 {
        return Err(DnsError::NotOurs);
    }
    let rcode = m[3] & 0x0f;
    if rcode != 0 {
        return Err(DnsError::Rcode(rcode));
    }
    let qd = u16::from_be_bytes([m[4], m[5]]);
    let an = u16::from_be_bytes([m[6], m[7]]);
    if qd != 1 {
        return Err(DnsError::NotOurs);
    }
    let mut at = skip_name(m, 12)?;
    let qt = m.get(at..at + 2).ok_or(DnsError::Malformed)?;
    if u16::from_be_bytes([qt[0], qt[1]]) != qtype {
        return Err(DnsError::NotOurs);
    }
    at += 4;
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for _ in 0..an {
        at = skip_name(m, at)?;
        let h = m.get(at..at + 10).ok_or(DnsError::Malformed)?;
        let ty = u16::from_be_bytes([h[0], h[1]]);
        let class = u16::from_be_bytes([h[2], h[3]]);
        let rttl = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let rdlen = usize::from(u16::from_be_bytes([h[8], h[9]]));
        at += 10;
        let rdata = m.get(at..at + rdlen).ok_or(DnsError::Malformed)?;
        at += rdlen;
        if class != CLASS_IN {
            continue;
        }
        match (ty, rdlen) {
            (TYPE_A, 4) if qtype == TYPE_A => {
                addrs.push(IpAddr::V4(Ipv4Addr::new(
                    rdata[0], rdata[1], rdata[2], rdata[3],
                )));
                ttl = ttl.min(rttl);
            }
            (TYPE_AAAA, 16) if qtype == TYPE_AAAA => {
                let mut b = [0u8; 16];
                b.copy_from_slice(rdata);
                addrs.push(IpAddr::V6(Ipv6Addr::from(b)));
                ttl = ttl.min(rttl);
            }
            (TYPE_CNAME, _) => ttl = ttl.min(rttl),
            _ => {}
        }
    }
    if ttl == u32::MAX {
        ttl = 0;
    }
    Ok((addrs, ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: u16, qtype: u16, records: &[(u16, u32, &[u8])]) -> Vec<u8> {
        let mut m = build_query(id, "web.test", qtype).expect("query");
        m[2] |= 0x80;
        m[7] = records.len() as u8;
        for (ty, ttl, data) in records {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend_from_slice(data);
        }
        m
    }

    #[test]
    fn query_layout() {
        let q = build_query(0x1234, "web.test", TYPE_A).expect("query");
        assert_eq!(
            q,
            [
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e', b'b', 4, b't', b'e', b's',
                b't', 0, 0, 1, 0, 1
            ]
        );
        assert_eq!(build_query(1, "a..b", TYPE_A), Err(DnsError::BadName));
        assert_eq!(
            build_query(1, &"a".repeat(64), TYPE_A),
            Err(DnsError::BadName)
        );
    }

    #[test]
    fn parses_answers_and_min_ttl() {
        let m = answer(
            7,
            TYPE_A,
            &[
                (TYPE_CNAME, 50, &[0xc0, 12]),
                (TYPE_A, 300, &[198, 18, 0, 10]),
                (TYPE_A, 60, &[198, 18, 0, 11]),
            ],
        );
        let (a, ttl) = parse_response(&m, 7, TYPE_A).expect("answer");
        assert_eq!(
            a,
            vec![
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)),
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11))
            ]
        );
        assert_eq!(ttl, 50);
        assert_eq!(parse_response(&m, 8, TYPE_A), Err(DnsError::NotOurs));
        let mut nx = answer(7, TYPE_A, &[]);
        nx[3] |= 3;
        assert_eq!(parse_response(&nx, 7, TYPE_A), Err(DnsError::Rcode(3)));
        for cut in 0..m.len() {
            let _ = parse_response(&m[..cut], 7, TYPE_A);
        }
    }
}
