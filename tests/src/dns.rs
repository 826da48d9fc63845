//! A minimal DNS client for the probes: one query over UDP (RFC 1035), and its answer.

use std::net::Ipv4Addr;

/// Query type A (RFC 1035 3.2.2).
pub const TYPE_A: u16 = 1;

/// A query type by name (RFC 1035 3.2.2, RFC 3596 2.1) or number.
pub fn parse_qtype(s: &str) -> Result<u16, String> {
    match s.to_ascii_uppercase().as_str() {
        "A" => Ok(TYPE_A),
        "NS" => Ok(2),
        "PTR" => Ok(12),
        "MX" => Ok(15),
        "TXT" => Ok(16),
        "AAAA" => Ok(28),
        "SRV" => Ok(33),
        n => n.parse().map_err(|_| {
            format!("unknown query type {s:?} (A, NS, PTR, MX, TXT, AAAA, SRV or a number)")
        }),
    }
}

/// The query message for `name`, type `qtype`, class IN, recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, String> {
    let mut m = Vec::with_capacity(18 + name.len());
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00]); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("bad name {name:?}"));
        }
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]); // IN
    Ok(m)
}

/// The rcode names of RFC 1035 and 2136.
pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("rcode {n}"),
    }
}

fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, String> {
    loop {
        let len = *msg.get(pos).ok_or("truncated name")?;
        match len {
            0 => return Ok(pos + 1),
            l if l & 0xc0 == 0xc0 => return Ok(pos + 2),
            l => pos += 1 + usize::from(l),
        }
    }
}

fn u16_at(msg: &[u8], pos: usize) -> Result<u16, String> {
    match msg.get(pos..pos + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err("truncated message".into()),
    }
}

/// An answer's records: the A records, and how many records of any type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub a: Vec<Ipv4Addr>,
    pub records: u16,
}

/// The records of an answer to query `id`; Err with the rcode name or what is malformed.
pub fn parse_answer(id: u16, msg: &[u8]) -> Result<Answer, String> {
    if msg.len() < 12 {
        return Err("truncated message".into());
    }
    if u16_at(msg, 0)? != id {
        return Err("answer to another query".into());
    }
    if msg[2] & 0x80 == 0 {
        return Err("not a response".into());
    }
    let rcode = msg[3] & 0x0f;
    if rcode != 0 {
        return Err(rcode_name(rcode));
    }
    let qd = u16_at(msg, 4)?;
    let an = u16_at(msg, 6)?;
    let mut pos = 12;
    for _ in 0..qd {
        pos = skip_name(msg, pos)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        pos = skip_name(msg, pos)?;
        let rtype = u16_at(msg, pos)?;
        let class = u16_at(msg, pos + 2)?;
        let rdlen = usize::from(u16_at(msg, pos + 8)?);
        let rdata = msg
            .get(pos + 10..pos + 10 + rdlen)
            .ok_or("truncated record")?;
        if rtype == 1 && class == 1 && rdlen == 4 {
            out.push(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        pos += 10 + rdlen;
    }
    Ok(Answer {
        a: out,
        records: an,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encoding() {
        let q = query(0x1234, "web.test", TYPE_A).expect("valid");
        assert_eq!(
            q,
            [
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e', b'b', 4, b't', b'e', b's',
                b't', 0, 0, 1, 0, 1
            ]
        );
        assert!(query(1, "a..b", TYPE_A).is_err());
        // MX is type 15 (RFC 1035 3.2.2), in the two bytes before the class.
        let mx = query(1, "web.test", parse_qtype("mx").expect("known")).expect("valid");
        assert_eq!(mx[mx.len() - 4..], [0, 15, 0, 1]);
        assert_eq!(parse_qtype("65"), Ok(65));
        assert!(parse_qtype("bogus").is_err());
    }

    #[test]
    fn answer_with_compression() {
        let mut m = query(7, "web.test", TYPE_A).expect("valid");
        m[2] = 0x81;
        m[3] = 0x80;
        m[7] = 1; // ANCOUNT 1
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 10]);
        assert_eq!(
            parse_answer(7, &m),
            Ok(Answer {
                a: vec![Ipv4Addr::new(198, 18, 0, 10)],
                records: 1
            })
        );
        assert_eq!(parse_answer(8, &m), Err("answer to another query".into()));
        m[3] = 0x83;
        assert_eq!(parse_answer(7, &m), Err("NXDOMAIN".into()));
        m[3] = 0x84;
        assert_eq!(parse_answer(7, &m), Err("NOTIMP".into()));
        assert!(parse_answer(7, &m[..5]).is_err());
    }
}
