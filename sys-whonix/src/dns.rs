//! DNS messages as the gateway's virtual resolvers read and answer them (RFC 1035 4.1): one
//! question in, an answer built around that same question out. What is answered follows C
//! tor's DNSPort (tor `src/feature/dnsserv/dnsserv.c`), which Whonix's leak tests expect: A and
//! AAAA are resolved through Tor, PTR reverse-resolved, every other type or class gets
//! NOTIMP, and a query that is not a standard query of one question gets FORMERR.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// RFC 1035 3.2.2 TYPE values the gateway knows.
pub const TYPE_A: u16 = 1;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_MX: u16 = 15;
pub const TYPE_AAAA: u16 = 28;
/// RFC 1035 3.2.4 CLASS IN.
pub const CLASS_IN: u16 = 1;

/// RFC 1035 4.1.1 RCODE values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// The longest name (RFC 1035 2.3.4: 255 octets on the wire).
const MAX_NAME: usize = 255;

/// A parsed query: its header fields and its one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The header's OPCODE (0: standard query).
    pub opcode: u8,
    /// Recursion desired, echoed in the answer.
    pub rd: bool,
    /// The question's name, lower-cased, without the final dot (empty: the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question's bytes (name, type, class) as they came, copied into the answer.
    question: Vec<u8>,
}

/// Why a message could not be read as a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header, or a response: not answered at all.
    NotAQuery,
    /// A query, but not one the resolver can read (answered FORMERR with the header only).
    Format { id: u16, opcode: u8, rd: bool },
}

/// What the resolver does with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Resolve the name to addresses of this family through Tor.
    Forward { name: String, v6: bool },
    /// Reverse-resolve the address through Tor.
    Reverse(IpAddr),
    /// Answer at once with this code and no records.
    Refuse(Rcode),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a query (RFC 1035 4.1.1, 4.1.2). Names in a question are never compressed (nothing
/// precedes them to point at), so a pointer is a format error.
pub fn parse_query(msg: &[u8]) -> Result<Query, ParseError> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return Err(ParseError::NotAQuery);
    }
    let id = be16(msg, 0);
    let opcode = (msg[2] >> 3) & 0x0f;
    let rd = msg[2] & 0x01 != 0;
    let format = ParseError::Format { id, opcode, rd };
    if be16(msg, 4) != 1 {
        return Err(format);
    }
    let mut at = 12;
    let mut name = String::new();
    loop {
        let len = usize::from(*msg.get(at).ok_or(format)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 || at + len > msg.len() || at - 12 + len > MAX_NAME {
            return Err(format);
        }
        let label = &msg[at..at + len];
        // Host names (RFC 1123 2.1) and the underscores of service labels; nothing a Tor
        // exit would take differently than we read it (no dots, no controls).
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return Err(format);
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    if at + 4 > msg.len() {
        return Err(format);
    }
    let qtype = be16(msg, at);
    let qclass = be16(msg, at + 2);
    Ok(Query {
        id,
        opcode,
        rd,
        name,
        qtype,
        qclass,
        question: msg[12..at + 4].to_vec(),
    })
}

/// What to do with `q`, as C tor's DNSPort does.
pub fn lookup_for(q: &Query) -> Lookup {
    if q.opcode != 0 {
        return Lookup::Refuse(Rcode::NotImp);
    }
    if q.qclass != CLASS_IN {
        return Lookup::Refuse(Rcode::NotImp);
    }
    match q.qtype {
        TYPE_A | TYPE_AAAA if q.name.is_empty() => Lookup::Refuse(Rcode::NxDomain),
        TYPE_A => Lookup::Forward {
            name: q.name.clone(),
            v6: false,
        },
        TYPE_AAAA => Lookup::Forward {
            name: q.name.clone(),
            v6: true,
        },
        TYPE_PTR => match reverse_name(&q.name) {
            Some(a) => Lookup::Reverse(a),
            None => Lookup::Refuse(Rcode::NxDomain),
        },
        _ => Lookup::Refuse(Rcode::NotImp),
    }
}

/// The address a reverse-lookup name stands for (RFC 1035 3.5 `in-addr.arpa`, RFC 3596 2.5
/// `ip6.arpa`).
pub fn reverse_name(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let parts: Vec<&str> = rest.split('.').collect();
        if parts.len() != 4 {
            return None;
        }
        let mut o = [0u8; 4];
        for (i, p) in parts.iter().rev().enumerate() {
            if p.is_empty() || p.len() > 3 || (p.len() > 1 && p.starts_with('0')) {
                return None;
            }
            o[i] = p.parse().ok()?;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(o)));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<&str> = rest.split('.').collect();
    if nibbles.len() != 32 {
        return None;
    }
    let mut v: u128 = 0;
    for n in nibbles.iter().rev() {
        if n.len() != 1 {
            return None;
        }
        v = (v << 4) | u128::from(u8::from_str_radix(n, 16).ok()?);
    }
    Some(IpAddr::V6(Ipv6Addr::from(v)))
}

/// The reverse-lookup name of an address (the inverse of [`reverse_name`]).
pub fn reverse_name_of(a: IpAddr) -> String {
    match a {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::new();
            for b in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0x0f, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// A record of the answer section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Addr(IpAddr),
    Ptr(String),
}

/// Writes a name uncompressed (RFC 1035 3.1). None if a label is empty or too long.
fn put_name(out: &mut Vec<u8>, name: &str) -> Option<()> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.len() > MAX_NAME - 2 {
        return None;
    }
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    Some(())
}

/// The answer to `q`: the same id, question and RD, RA set (the gateway recurses, through
/// Tor), `rcode`, and `answers` under the question's name (a compression pointer to it,
/// RFC 1035 4.1.4) with `ttl` seconds. Records that do not fit the question's type are left
/// out (an A query never gets an IPv6 address).
pub fn response(q: &Query, rcode: Rcode, answers: &[Answer], ttl: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + q.question.len() + answers.len() * 28);
    out.extend_from_slice(&q.id.to_be_bytes());
    out.push(0x80 | (q.opcode << 3) | u8::from(q.rd));
    out.push(0x80 | rcode as u8);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&q.question);
    let mut count: u16 = 0;
    for a in answers {
        let mut rdata = Vec::new();
        let rtype = match (a, q.qtype) {
            (Answer::Addr(IpAddr::V4(v4)), TYPE_A) => {
                rdata.extend_from_slice(&v4.octets());
                TYPE_A
            }
            (Answer::Addr(IpAddr::V6(v6)), TYPE_AAAA) => {
                rdata.extend_from_slice(&v6.octets());
                TYPE_AAAA
            }
            (Answer::Ptr(n), TYPE_PTR) => {
                if put_name(&mut rdata, n).is_none() {
                    continue;
                }
                TYPE_PTR
            }
            _ => continue,
        };
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
        count += 1;
    }
    out[6..8].copy_from_slice(&count.to_be_bytes());
    out
}

/// A FORMERR answer for a query that could not be read: the header alone.
pub fn format_error(id: u16, opcode: u8, rd: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&id.to_be_bytes());
    out.push(0x80 | (opcode << 3) | u8::from(rd));
    out.push(0x80 | Rcode::FormErr as u8);
    out.extend_from_slice(&[0; 8]);
    out
}

/// A query for `name` of `qtype` (tests, and the benchmark's probes).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    let _ = put_name(&mut out, name);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1035 4.1: header, then the question "www.example.com A IN".
    const QUERY: [u8; 33] = [
        0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 3, b'w', b'w',
        b'w', 7, b'E', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0, 0x00, 0x01,
        0x00, 0x01,
    ];

    #[test]
    fn a_query_is_read_and_answered_around_its_own_question() {
        let q = parse_query(&QUERY).expect("query");
        assert_eq!((q.id, q.opcode, q.rd), (0xabcd, 0, true));
        assert_eq!(q.name, "www.example.com");
        assert_eq!(
            lookup_for(&q),
            Lookup::Forward {
                name: "www.example.com".into(),
                v6: false
            }
        );
        let r = response(
            &q,
            Rcode::NoError,
            &[
                Answer::Addr("198.18.0.10".parse().expect("ip")),
                Answer::Addr("2001:db8::1".parse().expect("ip")),
            ],
            60,
        );
        // Header: same id; QR, RD; RA, NOERROR; one question, one answer (the IPv6
        // address does not answer an A query).
        assert_eq!(&r[..12], &[0xab, 0xcd, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&r[12..33], &QUERY[12..]);
        // The record: pointer to offset 12, A, IN, TTL 60, 4 bytes, the address.
        assert_eq!(
            &r[33..],
            &[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 10]
        );
    }

    #[test]
    fn types_tor_cannot_resolve_get_notimp_as_from_c_tors_dnsport() {
        let mx = build_query(7, "example.com", TYPE_MX);
        let q = parse_query(&mx).expect("mx");
        assert_eq!(lookup_for(&q), Lookup::Refuse(Rcode::NotImp));
        let r = response(&q, Rcode::NotImp, &[], 0);
        assert_eq!(r[3] & 0x0f, 4);
        assert_eq!(&r[6..8], &[0, 0]);
        let mut chaos = build_query(8, "version.bind", 16);
        let n = chaos.len();
        chaos[n - 1] = 3; // class CH
        let q = parse_query(&chaos).expect("ch");
        assert_eq!(lookup_for(&q), Lookup::Refuse(Rcode::NotImp));
        let mut notify = QUERY;
        notify[2] = 4 << 3; // opcode NOTIFY
        let q = parse_query(&notify).expect("notify");
        assert_eq!(lookup_for(&q), Lookup::Refuse(Rcode::NotImp));
    }

    #[test]
    fn what_is_not_one_readable_question_is_a_format_error_or_ignored() {
        assert_eq!(parse_query(&QUERY[..11]), Err(ParseError::NotAQuery));
        let mut resp = QUERY;
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(ParseError::NotAQuery));
        let fmt = ParseError::Format {
            id: 0xabcd,
            opcode: 0,
            rd: true,
        };
        let mut two = QUERY;
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(fmt));
        assert_eq!(parse_query(&QUERY[..30]), Err(fmt), "cut in the type");
        let mut ptr = QUERY;
        ptr[12] = 0xc0; // a compression pointer in the question
        assert_eq!(parse_query(&ptr), Err(fmt));
        let mut dot = QUERY;
        dot[14] = b'.';
        assert_eq!(parse_query(&dot), Err(fmt), "a dot inside a label");
        let e = format_error(0xabcd, 0, true);
        assert_eq!(e, vec![0xab, 0xcd, 0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn reverse_names_go_both_ways_and_bad_ones_are_not_addresses() {
        let a: IpAddr = "198.18.0.10".parse().expect("ip");
        assert_eq!(reverse_name_of(a), "10.0.18.198.in-addr.arpa");
        assert_eq!(reverse_name("10.0.18.198.in-addr.arpa"), Some(a));
        let b: IpAddr = "2001:db8::567:89ab".parse().expect("ip");
        // RFC 3596 2.5's example.
        assert_eq!(
            reverse_name_of(b),
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        assert_eq!(reverse_name(&reverse_name_of(b)), Some(b));
        assert_eq!(reverse_name("1.2.3.in-addr.arpa"), None);
        assert_eq!(reverse_name("256.0.0.1.in-addr.arpa"), None);
        assert_eq!(reverse_name("01.0.0.1.in-addr.arpa"), None);
        let q = parse_query(&build_query(9, "1.2.3.in-addr.arpa", TYPE_PTR)).expect("q");
        assert_eq!(lookup_for(&q), Lookup::Refuse(Rcode::NxDomain));
        let q = parse_query(&build_query(9, "10.0.18.198.in-addr.arpa", TYPE_PTR)).expect("q");
        assert_eq!(lookup_for(&q), Lookup::Reverse(a));
        let r = response(
            &q,
            Rcode::NoError,
            &[Answer::Ptr("web.example.".into())],
            60,
        );
        let rd = &r[r.len() - 13..];
        assert_eq!(rd, b"\x03web\x07example\x00");
        assert_eq!(&r[r.len() - 15..r.len() - 13], &[0, 13], "RDLENGTH 13");
    }
}
