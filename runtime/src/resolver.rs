//! A sans-IO stub resolver for the names in `dsthost` rules: it says what to send and when,
//! takes what came back, and gives answers; the caller moves the bytes (through the host
//! stack) and supplies the time (the engine's [`Instant`]).
//!
//! Each query goes out from a fresh random port with a random id (RFC 5452 section 9.2), to
//! the configured servers in turn, and is retried after [`QUERY_TIMEOUT`] up to
//! [`QUERY_TRIES`] times. A name's answer is its A (and, with IPv6, AAAA) records, CNAMEs
//! followed (RFC 1034 section 3.6.2), with the smallest TTL; a name with no address fails
//! (rules using it fail closed). Messages are built and parsed with simple-dns.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use qubes_engine::Instant;
use simple_dns::rdata::RData;
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};

/// A query unanswered this long is sent again.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Sends of one query at most.
pub const QUERY_TRIES: u32 = 3;
/// Source ports are drawn from the dynamic range (RFC 6335 section 6).
const PORT_LO: u16 = 49_152;

/// What the resolver asks the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Open a UDP socket on this local port.
    Open(u16),
    /// Send this datagram from `port` to `to`.
    Send {
        port: u16,
        to: SocketAddr,
        payload: Vec<u8>,
    },
    /// Close the socket on this port.
    Close(u16),
}

/// The outcome of a lookup: addresses with the TTL to keep them (seconds), or `None`.
pub type Answer = (String, Option<(Vec<IpAddr>, u32)>);

#[derive(Debug)]
struct Query {
    name: String,
    qtype: TYPE,
    id: u16,
    port: u16,
    sent: Instant,
    tries: u32,
}

#[derive(Debug, Default)]
struct Pending {
    addrs: Vec<IpAddr>,
    ttl: u32,
    outstanding: u32,
}

/// The resolver.
#[derive(Debug)]
pub struct Resolver {
    servers: Vec<IpAddr>,
    want_v6: bool,
    queries: Vec<Query>,
    pending: BTreeMap<String, Pending>,
    effects: VecDeque<Effect>,
    answers: VecDeque<Answer>,
    rng: u64,
}

impl Resolver {
    /// A resolver asking `servers` (tried in turn), seeded for ids and ports.
    pub fn new(servers: Vec<IpAddr>, seed: u64) -> Self {
        Resolver {
            servers,
            want_v6: false,
            queries: Vec::new(),
            pending: BTreeMap::new(),
            effects: VecDeque::new(),
            answers: VecDeque::new(),
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Follows a change of servers (new QubesDB DNS keys) and of whether AAAA is wanted.
    pub fn configure(&mut self, servers: Vec<IpAddr>, want_v6: bool) {
        self.servers = servers;
        self.want_v6 = want_v6;
    }

    fn next_rand(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Starts looking `name` up (a lookup already under way is not started twice).
    pub fn lookup(&mut self, now: Instant, name: &str) {
        if self.pending.contains_key(name) {
            return;
        }
        if self.servers.is_empty() || Name::new(name).is_err() {
            self.answers.push_back((name.to_string(), None));
            return;
        }
        let mut qtypes = vec![TYPE::A];
        if self.want_v6 {
            qtypes.push(TYPE::AAAA);
        }
        self.pending.insert(
            name.to_string(),
            Pending {
                outstanding: qtypes.len() as u32,
                ttl: u32::MAX,
                ..Pending::default()
            },
        );
        for qtype in qtypes {
            self.send(now, name.to_string(), qtype, 0);
        }
    }

    fn free_port(&mut self) -> u16 {
        loop {
            let p = PORT_LO + (self.next_rand() as u16 % (u16::MAX - PORT_LO));
            if !self.queries.iter().any(|q| q.port == p) {
                return p;
            }
        }
    }

    fn send(&mut self, now: Instant, name: String, qtype: TYPE, tries: u32) {
        let id = self.next_rand() as u16;
        let port = self.free_port();
        let server = self.servers[tries as usize % self.servers.len()];
        let mut q = Packet::new_query(id);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        let Ok(qname) = Name::new(&name) else {
            return self.part_done(&name, None);
        };
        q.questions.push(Question::new(
            qname,
            QTYPE::TYPE(qtype),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let Ok(payload) = q.build_bytes_vec() else {
            return self.part_done(&name, None);
        };
        self.effects.push_back(Effect::Open(port));
        self.effects.push_back(Effect::Send {
            port,
            to: SocketAddr::new(server, 53),
            payload,
        });
        self.queries.push(Query {
            name,
            qtype,
            id,
            port,
            sent: now,
            tries: tries + 1,
        });
    }

    /// A datagram that arrived on `port` from `from`. Anything that is not the answer to the
    /// query on that port (wrong server, id, question) is ignored: a spoofed answer must
    /// guess the port and the id.
    pub fn datagram(&mut self, port: u16, from: SocketAddr, payload: &[u8]) {
        let Some(pos) = self.queries.iter().position(|q| q.port == port) else {
            return;
        };
        let q = &self.queries[pos];
        if from.port() != 53 || !self.servers.contains(&from.ip()) {
            return;
        }
        let Some(result) = parse_answer(payload, q.id, &q.name, q.qtype) else {
            return;
        };
        let q = self.queries.remove(pos);
        self.effects.push_back(Effect::Close(q.port));
        self.part_done(&q.name, Some(result));
    }

    /// Retries or fails the queries whose time ran out.
    pub fn poll_timeouts(&mut self, now: Instant) {
        let mut expired = Vec::new();
        self.queries.retain(|q| {
            let due = now.saturating_duration_since(q.sent) >= QUERY_TIMEOUT;
            if due {
                expired.push((q.name.clone(), q.qtype, q.port, q.tries));
            }
            !due
        });
        for (name, qtype, port, tries) in expired {
            self.effects.push_back(Effect::Close(port));
            if tries < QUERY_TRIES {
                self.send(now, name, qtype, tries);
            } else {
                self.part_done(&name, Some((Vec::new(), 0)));
            }
        }
    }

    /// When the next timeout is due, if a query is out.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.queries.iter().map(|q| q.sent + QUERY_TIMEOUT).min()
    }

    fn part_done(&mut self, name: &str, part: Option<(Vec<IpAddr>, u32)>) {
        let Some(p) = self.pending.get_mut(name) else {
            return;
        };
        match part {
            Some((addrs, ttl)) => {
                if !addrs.is_empty() {
                    p.ttl = p.ttl.min(ttl);
                }
                p.addrs.extend(addrs);
                p.outstanding = p.outstanding.saturating_sub(1);
            }
            None => p.outstanding = 0,
        }
        if p.outstanding > 0 {
            return;
        }
        let Some(p) = self.pending.remove(name) else {
            return;
        };
        // The other family's query of a failed name is no longer wanted.
        let stale: Vec<u16> = self
            .queries
            .iter()
            .filter(|q| q.name == name)
            .map(|q| q.port)
            .collect();
        self.queries.retain(|q| q.name != name);
        self.effects.extend(stale.into_iter().map(Effect::Close));
        let answer = (!p.addrs.is_empty()).then_some((p.addrs, p.ttl));
        self.answers.push_back((name.to_string(), answer));
    }

    /// The next thing to do.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// The next finished lookup.
    pub fn poll_answer(&mut self) -> Option<Answer> {
        self.answers.pop_front()
    }
}

/// The addresses of `qtype` for `name` in a response to query `id` (CNAMEs followed, the
/// smallest TTL of the records used), or `None` when it is not that response. A response
/// with an error code, or without addresses, is an answer with none.
fn parse_answer(m: &[u8], id: u16, name: &str, qtype: TYPE) -> Option<(Vec<IpAddr>, u32)> {
    let p = Packet::parse(m).ok()?;
    if p.id() != id || !p.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    let q = p.questions.first()?;
    if !q
        .qname
        .to_string()
        .eq_ignore_ascii_case(name.trim_end_matches('.'))
        || q.qtype != QTYPE::TYPE(qtype)
    {
        return None;
    }
    if p.rcode() != RCODE::NoError {
        return Some((Vec::new(), 0));
    }
    let mut target = name.trim_end_matches('.').to_ascii_lowercase();
    let mut ttl = u32::MAX;
    // CNAME chains are followed a bounded number of steps (a loop ends here).
    for _ in 0..8 {
        let cname = p.answers.iter().find_map(|rr| match &rr.rdata {
            RData::CNAME(c) if rr.name.to_string().eq_ignore_ascii_case(&target) => {
                Some((c.0.to_string().to_ascii_lowercase(), rr.ttl))
            }
            _ => None,
        });
        match cname {
            Some((next, t)) => {
                ttl = ttl.min(t);
                target = next;
            }
            None => break,
        }
    }
    let mut addrs = Vec::new();
    for rr in &p.answers {
        if !rr.name.to_string().eq_ignore_ascii_case(&target) {
            continue;
        }
        let a = match &rr.rdata {
            RData::A(a) if qtype == TYPE::A => IpAddr::V4(Ipv4Addr::from(a.address)),
            RData::AAAA(a) if qtype == TYPE::AAAA => IpAddr::V6(Ipv6Addr::from(a.address)),
            _ => continue,
        };
        ttl = ttl.min(rr.ttl);
        addrs.push(a);
    }
    if addrs.is_empty() {
        ttl = 0;
    }
    Some((addrs, ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 139, 1, 1));

    /// A DNS response written byte by byte from RFC 1035 section 4.1 (not with simple-dns):
    /// the question echoed, then the answers, names as pointers to the question (0xc00c).
    fn response(
        id: u16,
        qname: &str,
        qtype: u16,
        rcode: u8,
        answers: &[(u16, u32, &[u8])],
    ) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x81, 0x80 | rcode]);
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        for label in qname.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        for (ty, ttl, rdata) in answers {
            m.extend_from_slice(&[0xc0, 0x0c]);
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&1u16.to_be_bytes());
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    /// Runs the resolver's effects; returns the (port, query bytes) it sent.
    fn sent(r: &mut Resolver) -> Vec<(u16, Vec<u8>)> {
        let mut open = Vec::new();
        let mut out = Vec::new();
        while let Some(e) = r.poll_effect() {
            match e {
                Effect::Open(p) => open.push(p),
                Effect::Send { port, to, payload } => {
                    assert!(open.contains(&port), "sends from a port it opened");
                    assert_eq!(to, SocketAddr::new(SERVER, 53));
                    out.push((port, payload));
                }
                Effect::Close(p) => open.retain(|&o| o != p),
            }
        }
        out
    }

    fn query_id(q: &[u8]) -> u16 {
        u16::from_be_bytes([q[0], q[1]])
    }

    #[test]
    fn answers_with_the_records_of_the_name_and_the_smallest_ttl() {
        let mut r = Resolver::new(vec![SERVER], 1);
        r.lookup(Instant::from_secs(1), "web.test");
        let q = sent(&mut r);
        assert_eq!(q.len(), 1, "A only without IPv6");
        let (port, bytes) = &q[0];
        assert!(*port >= PORT_LO);
        // The query asks for web.test A, recursion desired (RFC 1035 4.1.1).
        assert_eq!(bytes[2] & 0x01, 0x01);
        assert!(bytes.windows(10).any(|w| w == b"\x03web\x04test\x00"));
        let id = query_id(bytes);
        let from = SocketAddr::new(SERVER, 53);
        // Wrong id, wrong server port, wrong server: all ignored.
        let good = response(
            id,
            "web.test",
            1,
            0,
            &[(1, 300, &[198, 18, 0, 10]), (1, 60, &[198, 18, 0, 11])],
        );
        r.datagram(
            *port,
            from,
            &response(id ^ 1, "web.test", 1, 0, &[(1, 1, &[1, 2, 3, 4])]),
        );
        r.datagram(*port, SocketAddr::new(SERVER, 5353), &good);
        r.datagram(
            *port,
            SocketAddr::new("10.0.0.1".parse().expect("ip"), 53),
            &good,
        );
        assert_eq!(r.poll_answer(), None);
        r.datagram(*port, from, &good);
        let (name, answer) = r.poll_answer().expect("answered");
        assert_eq!(name, "web.test");
        let (addrs, ttl) = answer.expect("addresses");
        assert_eq!(
            addrs,
            vec![
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)),
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11))
            ]
        );
        assert_eq!(ttl, 60);
        assert_eq!(r.poll_effect(), Some(Effect::Close(*port)));
    }

    #[test]
    fn nxdomain_and_silence_fail_closed_after_retries() {
        let mut r = Resolver::new(vec![SERVER], 2);
        r.configure(vec![SERVER], true);
        r.lookup(Instant::from_secs(1), "gone.test");
        let q = sent(&mut r);
        assert_eq!(q.len(), 2, "A and AAAA with IPv6");
        for (port, bytes) in &q {
            let qtype = if bytes.ends_with(&[0, 1, 0, 1]) {
                1
            } else {
                28
            };
            r.datagram(
                *port,
                SocketAddr::new(SERVER, 53),
                &response(query_id(bytes), "gone.test", qtype, 3, &[]),
            );
        }
        assert_eq!(r.poll_answer(), Some(("gone.test".to_string(), None)));

        let mut r = Resolver::new(vec![SERVER], 3);
        let t0 = Instant::from_secs(10);
        r.lookup(t0, "slow.test");
        let mut sends = sent(&mut r).len();
        let mut t = t0;
        for _ in 0..QUERY_TRIES {
            t += QUERY_TIMEOUT;
            r.poll_timeouts(t);
            sends += sent(&mut r).len();
        }
        assert_eq!(sends as u32, QUERY_TRIES);
        assert_eq!(r.poll_answer(), Some(("slow.test".to_string(), None)));
        assert_eq!(r.next_timeout(), None);
    }

    #[test]
    fn cnames_are_followed() {
        let mut r = Resolver::new(vec![SERVER], 4);
        r.lookup(Instant::ZERO, "www.test");
        let q = sent(&mut r);
        let (port, bytes) = &q[0];
        // www.test CNAME web.test (name as a pointer into the message), web.test A.
        let mut m = response(
            query_id(bytes),
            "www.test",
            1,
            0,
            &[(5, 120, &[3, b'w', b'e', b'b', 0xc0, 0x10])],
        );
        // Second answer: owner name web.test written out, A 198.18.0.10, TTL 30.
        m[7] = 2;
        m.extend_from_slice(&[3, b'w', b'e', b'b', 4, b't', b'e', b's', b't', 0]);
        m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 198, 18, 0, 10]);
        r.datagram(*port, SocketAddr::new(SERVER, 53), &m);
        let (_, answer) = r.poll_answer().expect("answered");
        assert_eq!(
            answer,
            Some((vec![IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10))], 30))
        );
    }
}
