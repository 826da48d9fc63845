//! A minimal DNS client for the probes: one A query over UDP (RFC 1035), and its answer.

use std::net::Ipv4Addr;

/// The query message for `name`, type A, class IN, recursion desired.
pub fn query(id: u16, name: &str) -> Result<Vec<u8>, String> {
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
    m.extend_from_slice(&[0, 1, 0, 1]); // A, IN
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

/// The A records of an answer to query `id`; Err with the rcode name or what is malformed.
pub fn parse_answer(id: u16, msg: &[u8]) -> Result<Vec<Ipv4Addr>, String> {
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encoding() {
        let q = query(0x1234, "web.test").expect("valid");
        assert_eq!(
            q,
            [
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e', b'b', 4, b't', b'e', b's',
                b't', 0, 0, 1, 0, 1
            ]
        );
        assert!(query(1, "a..b").is_err());
    }

    #[test]
    fn answer_with_compression() {
        let mut m = query(7, "web.test").expect("valid");
        m[2] = 0x81;
        m[3] = 0x80;
        m[7] = 1; // ANCOUNT 1
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 10]);
        assert_eq!(parse_answer(7, &m), Ok(vec![Ipv4Addr::new(198, 18, 0, 10)]));
        assert_eq!(parse_answer(8, &m), Err("answer to another query".into()));
        m[3] = 0x83;
        assert_eq!(parse_answer(7, &m), Err("NXDOMAIN".into()));
        assert!(parse_answer(7, &m[..5]).is_err());
    }
}
