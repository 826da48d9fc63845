//! A compiled first-match classifier for one client qube's agent rules.
//!
//! The agent turns a client's rules into an nft chain that the kernel walks rule by rule
//! (reference 3.3). Answering "what would that chain do with this packet" by walking the rules
//! costs time proportional to the rule count; [`Classifier`] answers the same question in time
//! that barely depends on it, and [`linear`] / [`LinearScan`] is the plain walk, kept as the
//! oracle the classifier is tested against and as the benchmark's baseline.
//!
//! # Semantics
//!
//! A packet is `(protocol, destination, port)`; for ICMP the port slot carries the ICMP type. The
//! first rule that matches decides; when none matches the packet is dropped (fail closed). A rule
//! matches when every field it sets matches:
//!
//! - `proto`: the packet's protocol (ICMPv6 counts as `icmp` for an IPv6 destination);
//! - `dstports`: the packet is TCP or UDP (and of `proto`, if set) and its port is in the range —
//!   so `dstports` without `proto` means "TCP or UDP", as the two nft lines the agent emits do;
//! - `icmptype`: the packet is ICMP of that type;
//! - `dst4` / `dst6`: the destination is in the prefix; a v4 rule never matches a v6 destination;
//! - `dsthost`: the destination is one of the name's resolved addresses;
//! - `specialtarget=dns`: the destination is one of the DNS servers, the packet is TCP or UDP (and
//!   of `proto`, if set) to port 53; a `dns` rule whose `dstports` is anything but `53` is skipped
//!   by the agent and so matches nothing.
//!
//! Names that do not resolve are handled by [`UnresolvedPolicy`].
//!
//! # Structure
//!
//! Every rule reduces, per address family, to "a set of address prefixes × a set of packet classes
//! (tcp, udp, icmp, other) × one port interval" (a host name or the DNS servers are a set of
//! single-address prefixes; no address means the `/0` prefix). CIDR prefixes are laminar — two
//! are either nested or disjoint — so the distinct prefixes of a family form a tree rooted at
//! `/0`, and the address space splits into segments that each lie in one deepest tree node.
//!
//! A lookup therefore (1) finds the segment holding the destination, by a binary search that a
//! small radix index on the high key bits narrows to a handful of candidates, (2) walks from that
//! node towards the root, and (3) at each node on the way looks the port up in that node's own
//! first-match port table. The answer is the smallest rule index seen. The walk is short (CIDR
//! depth, in practice two or three nodes) and is cut early: every node records the smallest rule
//! index anywhere on its path to the root, so the walk stops once nothing above can beat what
//! was found. Per class, the walk also skips ancestors that have no rules of that class.
//!
//! Why a tree instead of one flat table of address segments, each with the merged rule list of
//! every prefix covering it: a wide prefix with many port rules would be copied into every
//! segment of every narrower prefix inside it, which is quadratic in the rule count. In the tree
//! each rule is stored once per prefix it names.
//!
//! A node's port table is the first-match answer for every elementary port interval, built by
//! painting the node's rules in order onto the intervals (a rule only paints what earlier rules
//! left). Rules after one that covers every port at a node (or at an ancestor) can never win
//! there and are not stored; a node whose table is one interval keeps it inline. Tables with many
//! intervals get their own radix index, so a large `/0` table (many address-less port rules)
//! also costs a couple of probes.
//!
//! Rule indices are stored as `index << 1 | accept`, so the minimum over codes is the first rule
//! and the verdict needs no further memory access.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::agent::{MatchDst, MatchRule};
use crate::rule::{Action, Proto};

/// A packet's protocol as the classifier sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketProto {
    Tcp,
    Udp,
    /// ICMP for an IPv4 destination, ICMPv6 for an IPv6 one.
    Icmp,
    /// Any other IP protocol / next-header number. `Other(6)` and `Other(17)` are TCP and UDP,
    /// `Other(1)` to an IPv4 and `Other(58)` to an IPv6 destination are ICMP.
    Other(u8),
}

/// The lookup key: what the firewall looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Packet {
    pub proto: PacketProto,
    pub dst: IpAddr,
    /// The TCP/UDP destination port; for ICMP, the ICMP type (a value above 255 matches no
    /// `icmptype` rule). Ignored for other protocols.
    pub port: u16,
}

impl Packet {
    pub fn new(proto: PacketProto, dst: impl Into<IpAddr>, port: u16) -> Self {
        Packet {
            proto,
            dst: dst.into(),
            port,
        }
    }
}

/// What the rules do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub action: Action,
    /// The index, in the rule slice, of the first rule that matched; `None` when no rule matched
    /// (or the client is blocked as a whole), and then the action is `Drop`.
    pub rule: Option<usize>,
}

impl Verdict {
    /// No rule matched: drop (fail closed).
    pub const NO_MATCH: Verdict = Verdict {
        action: Action::Drop,
        rule: None,
    };

    /// `is_blocked` in the agent's sense (reference 3.3).
    pub fn is_blocked(self) -> bool {
        self.action == Action::Drop
    }
}

/// What to do when a `dsthost` name does not resolve (the resolver returns `None` or no
/// addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UnresolvedPolicy {
    /// Upstream: any unresolved name is a `RuleParseError`, and the whole client gets drop-all.
    #[default]
    BlockClient,
    /// An `accept` rule on an unresolved name matches nothing; a `drop` rule on an unresolved
    /// name still makes the whole client drop-all until it resolves, since skipping it would let
    /// through traffic the user meant to refuse (fail closed).
    SkipAccept,
}

/// Resolves `dsthost` names. `None` (or an empty list) means the name does not resolve.
///
/// Implemented for closures, e.g. `|name: &str| cache.get(name).cloned()`. Each distinct name is
/// asked once per compilation.
pub trait Resolver {
    fn resolve(&self, name: &str) -> Option<Vec<IpAddr>>;
}

impl<F: Fn(&str) -> Option<Vec<IpAddr>> + ?Sized> Resolver for F {
    fn resolve(&self, name: &str) -> Option<Vec<IpAddr>> {
        self(name)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared pieces: packet classes, name resolution.

const TCP: usize = 0;
const UDP: usize = 1;
const ICMP: usize = 2;
const OTHER: usize = 3;
const CLASSES: usize = 4;
const ALL_CLASSES: u8 = 0b1111;

/// The packet class a protocol falls in for a destination (`TCP`, `UDP`, `ICMP`, `OTHER`).
fn class_of(proto: PacketProto, dst: &IpAddr) -> usize {
    match proto {
        PacketProto::Tcp | PacketProto::Other(6) => TCP,
        PacketProto::Udp | PacketProto::Other(17) => UDP,
        PacketProto::Icmp => ICMP,
        PacketProto::Other(1) if dst.is_ipv4() => ICMP,
        PacketProto::Other(58) if dst.is_ipv6() => ICMP,
        PacketProto::Other(_) => OTHER,
    }
}

/// The outcome of resolving a rule list's names once.
#[derive(Debug, Clone, Default)]
struct Resolution {
    /// Per rule: the sorted, deduplicated addresses of its `dsthost` name, when it has one that
    /// resolved.
    addrs: Vec<Option<Vec<IpAddr>>>,
    /// Distinct unresolved names, in order of first use.
    unresolved: Vec<String>,
    /// The policy turned an unresolved name into drop-all.
    drop_all: bool,
}

fn resolve_rules<R: Resolver + ?Sized>(
    rules: &[MatchRule],
    resolver: &R,
    policy: UnresolvedPolicy,
) -> Resolution {
    let mut cache: HashMap<&str, Option<Vec<IpAddr>>> = HashMap::new();
    let mut res = Resolution {
        addrs: Vec::with_capacity(rules.len()),
        ..Resolution::default()
    };
    for rule in rules {
        let Some(MatchDst::Host(name)) = &rule.dst else {
            res.addrs.push(None);
            continue;
        };
        let addrs = match cache.get(name.as_str()) {
            Some(cached) => cached.clone(),
            None => {
                let got = resolver.resolve(name).and_then(|mut v| {
                    v.sort_unstable();
                    v.dedup();
                    (!v.is_empty()).then_some(v)
                });
                if got.is_none() {
                    res.unresolved.push(name.clone());
                }
                cache.insert(name.as_str(), got.clone());
                got
            }
        };
        if addrs.is_none() {
            match policy {
                UnresolvedPolicy::BlockClient => res.drop_all = true,
                UnresolvedPolicy::SkipAccept => {
                    if rule.action == Action::Drop {
                        res.drop_all = true;
                    }
                }
            }
        }
        res.addrs.push(addrs);
    }
    res
}

fn dedup_dns(dns: &[IpAddr]) -> Vec<IpAddr> {
    let mut v = dns.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

// ---------------------------------------------------------------------------------------------
// The reference: a first-match walk.

/// The reference implementation: names resolved once, then a first-match walk over the rules
/// per lookup, written straight from the semantics in the module documentation.
#[derive(Debug, Clone)]
pub struct LinearScan<'a> {
    rules: &'a [MatchRule],
    dns: Vec<IpAddr>,
    res: Resolution,
}

impl<'a> LinearScan<'a> {
    pub fn new<R: Resolver + ?Sized>(
        rules: &'a [MatchRule],
        dns: &[IpAddr],
        resolver: &R,
        policy: UnresolvedPolicy,
    ) -> Self {
        LinearScan {
            rules,
            dns: dedup_dns(dns),
            res: resolve_rules(rules, resolver, policy),
        }
    }

    pub fn lookup(&self, packet: Packet) -> Verdict {
        if self.res.drop_all {
            return Verdict::NO_MATCH;
        }
        let class = class_of(packet.proto, &packet.dst);
        for (i, rule) in self.rules.iter().enumerate() {
            let host = self.res.addrs.get(i).and_then(|a| a.as_deref());
            if rule_matches(rule, host, &self.dns, class, packet.dst, packet.port) {
                return Verdict {
                    action: rule.action,
                    rule: Some(i),
                };
            }
        }
        Verdict::NO_MATCH
    }

    /// Distinct names that did not resolve, in order of first use.
    pub fn unresolved(&self) -> &[String] {
        &self.res.unresolved
    }

    /// Whether an unresolved name blocks the whole client.
    pub fn is_drop_all(&self) -> bool {
        self.res.drop_all
    }
}

/// One lookup by a first-match walk (resolving the names first). See [`LinearScan`] to resolve
/// once and look up many times.
pub fn linear<R: Resolver + ?Sized>(
    rules: &[MatchRule],
    dns: &[IpAddr],
    resolver: &R,
    policy: UnresolvedPolicy,
    packet: Packet,
) -> Verdict {
    LinearScan::new(rules, dns, resolver, policy).lookup(packet)
}

/// Whether `a` is in `net/len`. A prefix length above the family's width counts as the width.
fn in_prefix(a: u128, net: u128, len: u8, width: u32) -> bool {
    let host_bits = width - u32::from(len).min(width);
    a.checked_shr(host_bits) == net.checked_shr(host_bits)
}

fn rule_matches(
    rule: &MatchRule,
    host: Option<&[IpAddr]>,
    dns: &[IpAddr],
    class: usize,
    dst: IpAddr,
    port: u16,
) -> bool {
    let proto_ok = match rule.proto {
        None => true,
        Some(Proto::Tcp) => class == TCP,
        Some(Proto::Udp) => class == UDP,
        Some(Proto::Icmp) => class == ICMP,
    };
    if !proto_ok {
        return false;
    }
    if (rule.dstports.is_some() || rule.dns) && class != TCP && class != UDP {
        return false;
    }
    if let Some(p) = rule.dstports {
        if port < p.lo || port > p.hi {
            return false;
        }
    }
    if rule.dns {
        if rule.dstports.is_some_and(|p| (p.lo, p.hi) != (53, 53)) {
            return false;
        }
        if port != 53 || !dns.contains(&dst) {
            return false;
        }
    }
    if let Some(t) = rule.icmptype {
        if class != ICMP || port != u16::from(t) {
            return false;
        }
    }
    match (&rule.dst, dst) {
        (None, _) => true,
        (Some(MatchDst::V4(net, len)), IpAddr::V4(a)) => in_prefix(
            u128::from(u32::from(a)),
            u128::from(u32::from(*net)),
            *len,
            32,
        ),
        (Some(MatchDst::V6(net, len)), IpAddr::V6(a)) => {
            in_prefix(u128::from(a), u128::from(*net), *len, 128)
        }
        (Some(MatchDst::V4(..)), IpAddr::V6(_)) | (Some(MatchDst::V6(..)), IpAddr::V4(_)) => false,
        (Some(MatchDst::Host(_)), _) => host.is_some_and(|h| h.contains(&dst)),
    }
}

// ---------------------------------------------------------------------------------------------
// The compiled form.

/// "No rule" code; larger than every rule code.
const NONE: u32 = u32::MAX;
/// Rule indices must leave room for `index << 1 | 1 < NONE`.
const MAX_RULES: usize = (u32::MAX >> 1) as usize;
/// `ClassNode::len` marking a table with its own radix index (`data` indexes `PortArena::big`).
const BIG: u32 = u32::MAX;
/// Tables with more intervals than this get a radix index.
const SMALL_TABLE: usize = 16;
/// Inline interval that contains no port (`lo = 1`, `hi = 0`).
const EMPTY_LOHI: u32 = 1;
/// Address radix indexes have at most `2^MAX_RADIX_BITS + 1` u32 entries (64 KiB and 4 bytes).
const MAX_RADIX_BITS: u32 = 14;

fn encode(index: usize, action: Action) -> u32 {
    // Callers keep `index < MAX_RULES`.
    ((index as u32) << 1) | u32::from(action == Action::Accept)
}

fn decode(code: u32) -> Verdict {
    if code == NONE {
        return Verdict::NO_MATCH;
    }
    Verdict {
        action: if code & 1 == 1 {
            Action::Accept
        } else {
            Action::Drop
        },
        rule: Some((code >> 1) as usize),
    }
}

/// Number of elements of a sorted slice that are `<= key`, without data-dependent branches (the
/// comparison becomes a conditional move), because lookups are unpredictable by nature.
fn count_le<T, K: Ord + Copy>(s: &[T], key: K, get: impl Fn(&T) -> K) -> usize {
    let mut base = 0usize;
    let mut size = s.len();
    if size == 0 {
        return 0;
    }
    while size > 1 {
        let half = size / 2;
        let mid = base + half;
        // `mid < base + size <= s.len()`. Arithmetic, not `if`, so it stays branch-free.
        base += half * usize::from(get(&s[mid]) <= key);
        size -= half;
    }
    base + usize::from(s.get(base).is_some_and(|x| get(x) <= key))
}

fn ceil_log2(n: usize) -> u32 {
    n.next_power_of_two().trailing_zeros()
}

/// An address key: `u32` for IPv4, `u128` for IPv6.
trait Key: Copy + Ord + std::fmt::Debug {
    fn widen(self) -> u128;
    fn narrow(v: u128) -> Self;
}

impl Key for u32 {
    fn widen(self) -> u128 {
        u128::from(self)
    }
    fn narrow(v: u128) -> Self {
        v as u32
    }
}

impl Key for u128 {
    fn widen(self) -> u128 {
        self
    }
    fn narrow(v: u128) -> Self {
        v
    }
}

/// A radix index over a sorted key array: for bucket `b` of a window `[base, base + 2^w)`,
/// `lo[b]` counts the keys below the bucket, so a lookup searches only `lo[b]..lo[b + 1]`.
///
/// The window is the span shared by the smallest non-zero and the largest key, so keys that all
/// sit in one corner of the space (IPv6 rules inside one /32, say) still spread over the buckets.
#[derive(Debug, Clone, Default)]
struct Radix {
    lo: Vec<u32>,
    base: u128,
    shift: u32,
}

impl Radix {
    /// No index for arrays short enough to search directly.
    fn build(keys: &[u128], min_len: usize) -> Radix {
        let n = keys.len();
        if n <= min_len {
            return Radix::default();
        }
        let first = keys.iter().copied().find(|&k| k != 0).unwrap_or(0);
        let last = keys.last().copied().unwrap_or(0);
        let w = (128 - (first ^ last).leading_zeros()).max(1);
        let k = ceil_log2(n).clamp(1, MAX_RADIX_BITS).min(w);
        let shift = w - k;
        let base = if w >= 128 {
            0
        } else {
            first & !((1u128 << w) - 1)
        };
        let nb = 1usize << k;
        let lo = (0..=nb)
            .map(|b| {
                let bound = (b as u128)
                    .checked_shl(shift)
                    .filter(|_| b < nb || w < 128)
                    .and_then(|o| base.checked_add(o));
                let c = match bound {
                    Some(bound) => keys.partition_point(|&x| x < bound),
                    None => n,
                };
                c as u32
            })
            .collect();
        Radix { lo, base, shift }
    }

    /// The index range that holds the last key `<= key`, given `n` keys.
    #[inline]
    fn range(&self, key: u128, n: usize) -> (usize, usize) {
        if self.lo.is_empty() {
            return (0, n);
        }
        let at = |i: usize| self.lo.get(i).map_or(n, |&v| v as usize);
        if key < self.base {
            return (0, at(0));
        }
        let b = (key - self.base) >> self.shift;
        let nb = self.lo.len() - 1;
        if b >= nb as u128 {
            (at(nb), n)
        } else {
            let b = b as usize;
            (at(b), at(b + 1))
        }
    }

    fn bytes(&self) -> usize {
        self.lo.capacity() * 4
    }
}

/// One address segment: from `start` up to the next segment's start, in tree node `node`.
#[derive(Debug, Clone, Copy)]
struct Seg<K> {
    start: K,
    node: u32,
}

/// Address → deepest tree node.
#[derive(Debug, Clone)]
struct AddrIndex<K> {
    segs: Vec<Seg<K>>,
    radix: Radix,
}

impl<K: Key> AddrIndex<K> {
    #[inline]
    fn node_of(&self, key: K) -> u32 {
        let (a, b) = self.radix.range(key.widen(), self.segs.len());
        let slice = self.segs.get(a..b).unwrap_or(&[]);
        let i = a + count_le(slice, key, |s| s.start);
        self.segs.get(i.wrapping_sub(1)).map_or(0, |s| s.node)
    }

    fn bytes(&self) -> usize {
        self.segs.capacity() * std::mem::size_of::<Seg<K>>() + self.radix.bytes()
    }
}

/// A tree node's view for one packet class.
#[derive(Debug, Clone, Copy)]
struct ClassNode {
    /// `len == 0`: the table is one inline interval `lo = lohi & 0xffff ..= hi = lohi >> 16`
    /// answering `data`. `len == BIG`: `data` indexes `PortArena::big`. Otherwise the table is
    /// `PortArena::{starts, codes}[data..data + len]`.
    lohi: u32,
    data: u32,
    len: u32,
    /// The smallest rule code at this node or any ancestor, for this class: once the best
    /// match so far is smaller, the walk can stop.
    min_up: u32,
    /// The nearest ancestor with rules of this class, or `NONE`.
    parent: u32,
}

/// A large port table with its radix index.
#[derive(Debug, Clone, Copy)]
struct BigTable {
    off: u32,
    len: u32,
    radix: u32,
    shift: u32,
}

/// Port tables of all nodes, back to back: each interval's first port and the code answering it.
#[derive(Debug, Clone, Default)]
struct PortArena {
    starts: Vec<u16>,
    codes: Vec<u32>,
    big: Vec<BigTable>,
    radix: Vec<u32>,
}

impl PortArena {
    #[inline(always)]
    fn search(&self, n: &ClassNode, port: u16) -> u32 {
        if n.len == 0 {
            let lo = (n.lohi & 0xffff) as u16;
            let hi = (n.lohi >> 16) as u16;
            return if lo <= port && port <= hi {
                n.data
            } else {
                NONE
            };
        }
        let (off, a, b) = if n.len == BIG {
            let Some(t) = self.big.get(n.data as usize) else {
                return NONE;
            };
            let r = t.radix as usize + usize::from(port >> t.shift);
            let at = |i: usize| self.radix.get(i).map_or(0, |&v| v as usize);
            (t.off as usize, at(r), at(r + 1).min(t.len as usize))
        } else {
            (n.data as usize, 0, n.len as usize)
        };
        let slice = self.starts.get(off + a..off + b).unwrap_or(&[]);
        let i = a + count_le(slice, port, |&s| s);
        self.codes
            .get((off + i).wrapping_sub(1))
            .copied()
            .unwrap_or(NONE)
    }

    /// Stores a first-match table given as `(first port, code)` intervals covering 0..=65535.
    fn store(&mut self, table: &[(u16, u32)]) -> (u32, u32, u32) {
        // Inline when at most one interval answers something.
        let live: Vec<usize> = (0..table.len())
            .filter(|&i| table.get(i).is_some_and(|t| t.1 != NONE))
            .collect();
        match live.as_slice() {
            [] => return (EMPTY_LOHI, NONE, 0),
            [i] => {
                let (lo, code) = table.get(*i).copied().unwrap_or((1, NONE));
                let hi = table
                    .get(i + 1)
                    .map_or(u16::MAX, |next| next.0.saturating_sub(1));
                return (u32::from(lo) | (u32::from(hi) << 16), code, 0);
            }
            _ => {}
        }
        let off = self.starts.len() as u32;
        self.starts.extend(table.iter().map(|t| t.0));
        self.codes.extend(table.iter().map(|t| t.1));
        if table.len() <= SMALL_TABLE {
            return (0, off, table.len() as u32);
        }
        let k = ceil_log2(table.len()).clamp(1, 12);
        let shift = 16 - k;
        let radix = self.radix.len() as u32;
        for b in 0..=(1u32 << k) {
            let bound = b << shift;
            let c = table.partition_point(|t| u32::from(t.0) < bound);
            self.radix.push(c as u32);
        }
        let big = self.big.len() as u32;
        self.big.push(BigTable {
            off,
            len: table.len() as u32,
            radix,
            shift,
        });
        (0, big, BIG)
    }

    fn bytes(&self) -> usize {
        self.starts.capacity() * 2
            + self.codes.capacity() * 4
            + self.big.capacity() * std::mem::size_of::<BigTable>()
            + self.radix.capacity() * 4
    }
}

/// The first-match table of rules `(code, lo, hi)` given in rule order: elementary port
/// intervals, each painted by the first rule covering it.
fn first_match_table(rules: &[(u32, u16, u16)]) -> Vec<(u16, u32)> {
    let mut bounds: Vec<u16> = Vec::with_capacity(rules.len() * 2 + 1);
    bounds.push(0);
    for &(_, lo, hi) in rules {
        bounds.push(lo);
        if let Some(next) = hi.checked_add(1) {
            bounds.push(next);
        }
    }
    bounds.sort_unstable();
    bounds.dedup();
    let n = bounds.len();
    let mut paint = vec![NONE; n];
    // `next[i]`: the first unpainted interval at or after `i` (union-find with path halving), so
    // every interval is painted once however many rules overlap it.
    let mut next: Vec<usize> = (0..=n).collect();
    fn find(next: &mut [usize], mut i: usize) -> usize {
        while let Some(&p) = next.get(i) {
            if p == i {
                break;
            }
            let gp = next.get(p).copied().unwrap_or(p);
            if let Some(slot) = next.get_mut(i) {
                *slot = gp;
            }
            i = gp;
        }
        i
    }
    let idx = |p: u16| bounds.partition_point(|&b| b <= p).saturating_sub(1);
    for &(code, lo, hi) in rules {
        let (s, e) = (idx(lo), idx(hi));
        let mut i = find(&mut next, s);
        while i <= e && i < n {
            if let Some(slot) = paint.get_mut(i) {
                *slot = code;
            }
            if let Some(slot) = next.get_mut(i) {
                *slot = i + 1;
            }
            i = find(&mut next, i + 1);
        }
    }
    let mut out: Vec<(u16, u32)> = Vec::new();
    for (&start, &code) in bounds.iter().zip(&paint) {
        if out.last().is_some_and(|l| l.1 == code) {
            continue;
        }
        out.push((start, code));
    }
    out
}

/// One rule's contribution to a family: an address interval, the classes, a port interval.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u128,
    end: u128,
    classes: u8,
    lo: u16,
    hi: u16,
    code: u32,
}

/// One address family's tree.
#[derive(Debug, Clone)]
struct Tree<K> {
    index: AddrIndex<K>,
    /// Per class, per node.
    nodes: [Vec<ClassNode>; CLASSES],
}

impl<K: Key> Tree<K> {
    fn build(mut entries: Vec<Entry>, max: u128, ports: &mut PortArena) -> Self {
        // Distinct prefixes in preorder: by start, wider first. The root (0, max) comes first.
        let mut prefixes: Vec<(u128, u128)> = entries.iter().map(|e| (e.start, e.end)).collect();
        prefixes.push((0, max));
        prefixes.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        prefixes.dedup();
        let n = prefixes.len();

        let mut parent = vec![NONE; n];
        let mut segs: Vec<Seg<K>> = vec![Seg {
            start: K::narrow(0),
            node: 0,
        }];
        let push_seg = |segs: &mut Vec<Seg<K>>, start: u128, node: u32| {
            let start = K::narrow(start);
            if let Some(last) = segs.last_mut() {
                if last.start == start {
                    last.node = node;
                    let len = segs.len();
                    if len >= 2 && segs.get(len - 2).is_some_and(|s| s.node == node) {
                        segs.pop();
                    }
                    return;
                }
                if last.node == node {
                    return;
                }
            }
            segs.push(Seg { start, node });
        };
        let mut stack: Vec<usize> = vec![0];
        for (i, &(s, _)) in prefixes.iter().enumerate().skip(1) {
            while let Some(&top) = stack.last() {
                let top_end = prefixes.get(top).map_or(max, |p| p.1);
                if top_end >= s || stack.len() == 1 {
                    break;
                }
                stack.pop();
                if let Some(&up) = stack.last() {
                    push_seg(&mut segs, top_end + 1, up as u32);
                }
            }
            if let (Some(&up), Some(slot)) = (stack.last(), parent.get_mut(i)) {
                *slot = up as u32;
            }
            push_seg(&mut segs, s, i as u32);
            stack.push(i);
        }
        while stack.len() > 1 {
            let Some(top) = stack.pop() else { break };
            let top_end = prefixes.get(top).map_or(max, |p| p.1);
            if let (Some(&up), true) = (stack.last(), top_end < max) {
                push_seg(&mut segs, top_end + 1, up as u32);
            }
        }
        let keys: Vec<u128> = segs.iter().map(|s| s.start.widen()).collect();
        let index = AddrIndex {
            radix: Radix::build(&keys, 8),
            segs,
        };

        // Per (class, node) rule lists in rule order.
        let node_of = |s: u128, e: u128| {
            prefixes
                .binary_search_by(|p| p.0.cmp(&s).then(e.cmp(&p.1)))
                .unwrap_or(0)
        };
        let mut per: Vec<(u8, u32, u32, u16, u16)> = Vec::new();
        for e in entries.drain(..) {
            let node = node_of(e.start, e.end) as u32;
            for c in 0..CLASSES {
                if e.classes & (1 << c) != 0 {
                    per.push((c as u8, node, e.code, e.lo, e.hi));
                }
            }
        }
        per.sort_unstable();

        let empty = ClassNode {
            lohi: EMPTY_LOHI,
            data: NONE,
            len: 0,
            min_up: NONE,
            parent: NONE,
        };
        let mut nodes: [Vec<ClassNode>; CLASSES] = Default::default();
        let mut cursor = 0usize;
        for (c, out) in nodes.iter_mut().enumerate() {
            *out = vec![empty; n];
            // Smallest code of a rule covering every port at the node or an ancestor.
            let mut full_min = vec![NONE; n];
            let mut has_own = vec![false; n];
            let mut own: Vec<(u32, u16, u16)> = Vec::new();
            for i in 0..n {
                own.clear();
                while let Some(&(pc, pn, code, lo, hi)) = per.get(cursor) {
                    if usize::from(pc) != c || pn as usize != i {
                        break;
                    }
                    own.push((code, lo, hi));
                    cursor += 1;
                }
                let p = parent.get(i).copied().unwrap_or(NONE);
                let pi = p as usize;
                let full_above = full_min.get(pi).copied().unwrap_or(NONE);
                let min_above = out.get(pi).map_or(NONE, |x| x.min_up);
                let class_parent = match (has_own.get(pi), out.get(pi)) {
                    (Some(true), _) => p,
                    (_, Some(x)) => x.parent,
                    _ => NONE,
                };
                // Rules after a full-port rule here or above can never win here.
                let mut kept = 0;
                let mut full_here = NONE;
                for &(code, lo, hi) in &own {
                    if code >= full_above {
                        break;
                    }
                    kept += 1;
                    if lo == 0 && hi == u16::MAX {
                        full_here = code;
                        break;
                    }
                }
                own.truncate(kept);
                let (lohi, data, len) = ports.store(&first_match_table(&own));
                let min_own = own.first().map_or(NONE, |r| r.0);
                if let Some(slot) = full_min.get_mut(i) {
                    *slot = full_above.min(full_here);
                }
                if let Some(slot) = has_own.get_mut(i) {
                    *slot = !own.is_empty();
                }
                if let Some(slot) = out.get_mut(i) {
                    *slot = ClassNode {
                        lohi,
                        data,
                        len,
                        min_up: min_own.min(min_above),
                        parent: class_parent,
                    };
                }
            }
        }
        Tree { index, nodes }
    }

    #[inline]
    fn find(&self, key: K, class: usize, port: u16, ports: &PortArena) -> u32 {
        let Some(nodes) = self.nodes.get(class) else {
            return NONE;
        };
        let mut node = self.index.node_of(key);
        let mut best = NONE;
        while let Some(n) = nodes.get(node as usize) {
            if n.min_up >= best {
                break;
            }
            best = best.min(ports.search(n, port));
            node = n.parent;
        }
        best
    }

    fn bytes(&self) -> usize {
        self.index.bytes()
            + self
                .nodes
                .iter()
                .map(|v| v.capacity() * std::mem::size_of::<ClassNode>())
                .sum::<usize>()
    }
}

/// `net/len` as an inclusive interval in a `width`-bit space.
fn prefix_interval(net: u128, len: u8, width: u32) -> (u128, u128) {
    let host_bits = width - u32::from(len).min(width);
    let mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |m| m - 1);
    let start = net & !mask;
    (start, start | mask)
}

fn key_of(a: &IpAddr) -> (bool, u128) {
    match a {
        IpAddr::V4(a) => (false, u128::from(u32::from(*a))),
        IpAddr::V6(a) => (true, u128::from(*a)),
    }
}

/// A rule's packet classes and port interval, or `None` when it can match nothing.
fn shape(rule: &MatchRule) -> Option<(u8, u16, u16)> {
    let mut classes = match rule.proto {
        None => ALL_CLASSES,
        Some(Proto::Tcp) => 1 << TCP,
        Some(Proto::Udp) => 1 << UDP,
        Some(Proto::Icmp) => 1 << ICMP,
    };
    let (mut lo, mut hi) = (0u16, u16::MAX);
    if let Some(p) = rule.dstports {
        classes &= (1 << TCP) | (1 << UDP);
        (lo, hi) = (p.lo, p.hi);
    }
    if rule.dns {
        if rule.dstports.is_some_and(|p| (p.lo, p.hi) != (53, 53)) {
            return None;
        }
        classes &= (1 << TCP) | (1 << UDP);
        (lo, hi) = (lo.max(53), hi.min(53));
    }
    if let Some(t) = rule.icmptype {
        classes &= 1 << ICMP;
        (lo, hi) = (lo.max(u16::from(t)), hi.min(u16::from(t)));
    }
    (classes != 0 && lo <= hi).then_some((classes, lo, hi))
}

/// A client's rules compiled for lookups whose cost hardly grows with the rule count.
///
/// Built by [`Classifier::compile`]; immutable afterwards (recompile when the rules, the DNS
/// servers or a name's addresses change). Same verdicts as [`LinearScan`].
#[derive(Debug, Clone)]
pub struct Classifier {
    drop_all: bool,
    unresolved: Vec<String>,
    rule_count: usize,
    v4: Tree<u32>,
    v6: Tree<u128>,
    ports: PortArena,
}

impl Classifier {
    /// Compiles `rules` (in order; normally ending with the policy rule) for a client whose
    /// netvm uses the DNS servers `dns` (both families). Every distinct `dsthost` name is resolved
    /// once through `resolver`.
    ///
    /// More than `u32::MAX / 2` rules cannot be represented and compile to drop-all.
    pub fn compile<R: Resolver + ?Sized>(
        rules: &[MatchRule],
        dns: &[IpAddr],
        resolver: &R,
        policy: UnresolvedPolicy,
    ) -> Classifier {
        let res = resolve_rules(rules, resolver, policy);
        let dns = dedup_dns(dns);
        let mut ports = PortArena::default();
        let mut v4: Vec<Entry> = Vec::new();
        let mut v6: Vec<Entry> = Vec::new();
        let drop_all = res.drop_all || rules.len() >= MAX_RULES;
        if !drop_all {
            for (i, rule) in rules.iter().enumerate() {
                let Some((classes, lo, hi)) = shape(rule) else {
                    continue;
                };
                let code = encode(i, rule.action);
                let host = res.addrs.get(i).and_then(|a| a.as_deref());
                let catch_all = rule.dst.is_none() && classes == ALL_CLASSES && !rule.dns;
                for (is_v6, out) in [(false, &mut v4), (true, &mut v6)] {
                    let width = if is_v6 { 128 } else { 32 };
                    let max = if is_v6 {
                        u128::MAX
                    } else {
                        u128::from(u32::MAX)
                    };
                    // The rule's destination as intervals of this family.
                    let mut set: Vec<(u128, u128)> = match &rule.dst {
                        None => vec![(0, max)],
                        Some(MatchDst::V4(a, l)) if !is_v6 => {
                            vec![prefix_interval(u128::from(u32::from(*a)), *l, width)]
                        }
                        Some(MatchDst::V6(a, l)) if is_v6 => {
                            vec![prefix_interval(u128::from(*a), *l, width)]
                        }
                        Some(MatchDst::V4(..) | MatchDst::V6(..)) => Vec::new(),
                        Some(MatchDst::Host(_)) => host
                            .unwrap_or(&[])
                            .iter()
                            .map(key_of)
                            .filter(|k| k.0 == is_v6)
                            .map(|k| (k.1, k.1))
                            .collect(),
                    };
                    if rule.dns {
                        set = dns
                            .iter()
                            .map(key_of)
                            .filter(|k| k.0 == is_v6)
                            .map(|k| k.1)
                            .filter(|&d| set.iter().any(|&(s, e)| s <= d && d <= e))
                            .map(|d| (d, d))
                            .collect();
                    }
                    out.extend(set.into_iter().map(|(start, end)| Entry {
                        start,
                        end,
                        classes,
                        lo,
                        hi,
                        code,
                    }));
                }
                if catch_all && lo == 0 && hi == u16::MAX {
                    // Matches every packet: nothing after it can win.
                    break;
                }
            }
        }
        let v4 = Tree::build(v4, u128::from(u32::MAX), &mut ports);
        let v6 = Tree::build(v6, u128::MAX, &mut ports);
        Classifier {
            drop_all,
            unresolved: res.unresolved,
            rule_count: rules.len(),
            v4,
            v6,
            ports,
        }
    }

    /// The verdict for one packet: the first matching rule, or drop when none matches.
    #[inline]
    pub fn lookup(&self, packet: Packet) -> Verdict {
        if self.drop_all {
            return Verdict::NO_MATCH;
        }
        let class = class_of(packet.proto, &packet.dst);
        let code = match packet.dst {
            IpAddr::V4(a) => self.v4.find(u32::from(a), class, packet.port, &self.ports),
            IpAddr::V6(a) => self.v6.find(u128::from(a), class, packet.port, &self.ports),
        };
        decode(code)
    }

    /// Distinct `dsthost` names that did not resolve, in order of first use: re-resolve them
    /// and recompile.
    pub fn unresolved(&self) -> &[String] {
        &self.unresolved
    }

    /// Whether the client is blocked as a whole (an unresolved name, under the policy).
    pub fn is_drop_all(&self) -> bool {
        self.drop_all
    }

    /// The number of rules compiled.
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }

    /// Heap and inline bytes held by the classifier.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.v4.bytes()
            + self.v6.bytes()
            + self.ports.bytes()
            + self
                .unresolved
                .iter()
                .map(|s| s.capacity() + std::mem::size_of::<String>())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::DstPorts;
    use std::cell::Cell;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn rule(action: Action) -> MatchRule {
        MatchRule {
            action,
            proto: None,
            dst: None,
            dstports: None,
            dns: false,
            icmptype: None,
        }
    }

    fn ports(lo: u16, hi: u16) -> Option<DstPorts> {
        Some(DstPorts { lo, hi })
    }

    fn v4(s: &str, l: u8) -> Option<MatchDst> {
        Some(MatchDst::V4(s.parse::<Ipv4Addr>().expect("v4"), l))
    }

    fn v6(s: &str, l: u8) -> Option<MatchDst> {
        Some(MatchDst::V6(s.parse::<Ipv6Addr>().expect("v6"), l))
    }

    fn host(s: &str) -> Option<MatchDst> {
        Some(MatchDst::Host(s.to_string()))
    }

    fn resolver(name: &str) -> Option<Vec<IpAddr>> {
        match name {
            "example.com" => Some(vec![ip("1.2.3.4"), ip("4.3.2.1")]),
            "example2.com" => Some(vec![ip("2001::1"), ip("2001::2")]),
            "empty.example" => Some(vec![]),
            _ => None,
        }
    }

    /// Both implementations, checked against each other, then the verdict.
    fn both(rules: &[MatchRule], dns: &[IpAddr], policy: UnresolvedPolicy, p: Packet) -> Verdict {
        let c = Classifier::compile(rules, dns, &resolver, policy);
        let l = linear(rules, dns, &resolver, policy, p);
        assert_eq!(c.lookup(p), l, "{p:?}");
        l
    }

    fn is_blocked_rules() -> Vec<MatchRule> {
        let d = Action::Drop;
        vec![
            MatchRule {
                proto: Some(Proto::Tcp),
                dstports: ports(80, 80),
                ..rule(d)
            },
            MatchRule {
                proto: Some(Proto::Tcp),
                dstports: ports(90, 92),
                ..rule(d)
            },
            MatchRule {
                proto: Some(Proto::Tcp),
                dst: host("example.com"),
                ..rule(d)
            },
            MatchRule {
                proto: Some(Proto::Tcp),
                dst: host("example2.com"),
                ..rule(d)
            },
            MatchRule {
                dst: v4("3.3.3.3", 32),
                ..rule(d)
            },
            MatchRule {
                dst: v4("4.4.4.4", 24),
                ..rule(d)
            },
            MatchRule {
                dst: v6("2002::3", 128),
                ..rule(d)
            },
            MatchRule {
                dst: v6("2003::3", 112),
                ..rule(d)
            },
            MatchRule {
                proto: Some(Proto::Udp),
                dns: true,
                ..rule(d)
            },
            rule(Action::Accept),
        ]
    }

    #[test]
    fn upstream_is_blocked_cases() {
        let dns = [ip("1.1.1.1"), ip("2.2.2.2"), ip("2001::1"), ip("2001::2")];
        let rules = is_blocked_rules();
        let pol = UnresolvedPolicy::BlockClient;
        let check =
            |proto, dst: &str, port| both(&rules, &dns, pol, Packet::new(proto, ip(dst), port));
        use PacketProto::{Tcp, Udp};
        assert_eq!(
            check(Tcp, "10.0.0.1", 443),
            Verdict {
                action: Action::Accept,
                rule: Some(9)
            }
        );
        assert!(!check(Udp, "10.0.0.1", 80).is_blocked());
        for (proto, dst, port, idx) in [
            (Tcp, "10.0.0.1", 80, 0),
            (Tcp, "10.0.0.1", 91, 1),
            (Tcp, "1.2.3.4", 123, 2),
            (Tcp, "4.3.2.1", 123, 2),
            (Tcp, "2003::2", 123, 7),
            (Tcp, "3.3.3.3", 123, 4),
            (Tcp, "4.4.4.8", 123, 5),
            (Tcp, "2002::3", 123, 6),
            (Tcp, "2003::5", 123, 7),
            (Udp, "1.1.1.1", 53, 8),
            (Udp, "2.2.2.2", 53, 8),
            (Udp, "2001::1", 53, 8),
            (Udp, "2001::2", 53, 8),
        ] {
            assert_eq!(
                check(proto, dst, port),
                Verdict {
                    action: Action::Drop,
                    rule: Some(idx)
                },
                "{proto:?} {dst} {port}"
            );
        }
        // Ports compare as numbers, not as upstream's strings ('90' <= '900' <= '92').
        assert!(!check(Tcp, "10.0.0.1", 900).is_blocked());
        assert!(!check(Tcp, "10.0.0.1", 100).is_blocked());
        // TCP to a DNS server on 53 is not covered by the udp-only dns rule.
        assert!(!check(Tcp, "1.1.1.1", 53).is_blocked());
        // example2.com's addresses are DNS servers too; tcp to them is dropped by rule 3.
        assert_eq!(check(Tcp, "2001::1", 53).rule, Some(3));
    }

    #[test]
    fn empty_rules_block() {
        let p = Packet::new(PacketProto::Tcp, ip("10.0.0.1"), 443);
        assert_eq!(
            both(&[], &[], UnresolvedPolicy::BlockClient, p),
            Verdict::NO_MATCH
        );
        assert!(Verdict::NO_MATCH.is_blocked());
    }

    #[test]
    fn dstports_without_proto_is_tcp_or_udp() {
        let rules = vec![
            MatchRule {
                dst: v4("10.0.0.0", 8),
                dstports: ports(1, 1024),
                ..rule(Action::Accept)
            },
            rule(Action::Drop),
        ];
        let pol = UnresolvedPolicy::BlockClient;
        let at =
            |proto, port| both(&rules, &[], pol, Packet::new(proto, ip("10.1.2.3"), port)).rule;
        assert_eq!(at(PacketProto::Tcp, 22), Some(0));
        assert_eq!(at(PacketProto::Udp, 1024), Some(0));
        assert_eq!(at(PacketProto::Other(6), 22), Some(0));
        assert_eq!(at(PacketProto::Udp, 1025), Some(1));
        assert_eq!(at(PacketProto::Icmp, 8), Some(1));
        assert_eq!(at(PacketProto::Other(47), 22), Some(1));
    }

    #[test]
    fn dns_rule_shapes() {
        let dns = [ip("1.1.1.1"), ip("2001::1")];
        let pol = UnresolvedPolicy::BlockClient;
        let dns_rule = |proto, dstports, dst| MatchRule {
            proto,
            dstports,
            dst,
            dns: true,
            ..rule(Action::Accept)
        };
        let at = |r: MatchRule, proto, dst: &str, port| {
            both(
                &[r, rule(Action::Drop)],
                &dns,
                pol,
                Packet::new(proto, ip(dst), port),
            )
            .rule
        };
        use PacketProto::{Icmp, Tcp, Udp};
        assert_eq!(at(dns_rule(None, None, None), Tcp, "1.1.1.1", 53), Some(0));
        assert_eq!(at(dns_rule(None, None, None), Udp, "2001::1", 53), Some(0));
        assert_eq!(at(dns_rule(None, None, None), Udp, "2001::1", 54), Some(1));
        assert_eq!(at(dns_rule(None, None, None), Udp, "1.1.1.2", 53), Some(1));
        assert_eq!(
            at(dns_rule(None, ports(53, 53), None), Udp, "1.1.1.1", 53),
            Some(0)
        );
        // Skipped entirely by the agent when dstports is not 53.
        assert_eq!(
            at(dns_rule(None, ports(80, 80), None), Tcp, "1.1.1.1", 80),
            Some(1)
        );
        assert_eq!(
            at(dns_rule(None, ports(1, 100), None), Tcp, "1.1.1.1", 53),
            Some(1)
        );
        assert_eq!(
            at(dns_rule(Some(Proto::Icmp), None, None), Icmp, "1.1.1.1", 53),
            Some(1)
        );
        assert_eq!(
            at(dns_rule(Some(Proto::Tcp), None, None), Udp, "1.1.1.1", 53),
            Some(1)
        );
        // With a destination too, both must hold.
        assert_eq!(
            at(dns_rule(None, None, v4("1.0.0.0", 8)), Tcp, "1.1.1.1", 53),
            Some(0)
        );
        assert_eq!(
            at(dns_rule(None, None, v4("2.0.0.0", 8)), Tcp, "1.1.1.1", 53),
            Some(1)
        );
        assert_eq!(
            at(
                dns_rule(None, None, host("example2.com")),
                Tcp,
                "2001::1",
                53
            ),
            Some(0)
        );
        assert_eq!(
            at(
                dns_rule(None, None, host("example.com")),
                Tcp,
                "1.1.1.1",
                53
            ),
            Some(1)
        );
    }

    #[test]
    fn icmp_types_and_families() {
        let rules = vec![
            MatchRule {
                proto: Some(Proto::Icmp),
                icmptype: Some(8),
                ..rule(Action::Accept)
            },
            MatchRule {
                dst: v4("0.0.0.0", 0),
                ..rule(Action::Drop)
            },
            rule(Action::Accept),
        ];
        let pol = UnresolvedPolicy::BlockClient;
        let at =
            |proto, dst: &str, port| both(&rules, &[], pol, Packet::new(proto, ip(dst), port)).rule;
        assert_eq!(at(PacketProto::Icmp, "8.8.8.8", 8), Some(0));
        assert_eq!(at(PacketProto::Other(1), "8.8.8.8", 8), Some(0));
        assert_eq!(at(PacketProto::Other(58), "8.8.8.8", 8), Some(1));
        assert_eq!(at(PacketProto::Other(58), "::8", 8), Some(0));
        assert_eq!(at(PacketProto::Other(1), "::8", 8), Some(2));
        assert_eq!(at(PacketProto::Icmp, "8.8.8.8", 264), Some(1));
        // A v4 /0 never matches a v6 destination.
        assert_eq!(at(PacketProto::Tcp, "::1", 1), Some(2));
    }

    #[test]
    fn out_of_range_fields_are_total() {
        // MatchRule fields are public; values `to_match` refuses must still not panic.
        let rules = vec![
            MatchRule {
                dst: v4("10.0.0.1", 77),
                ..rule(Action::Accept)
            },
            MatchRule {
                dst: v6("::1", 200),
                ..rule(Action::Accept)
            },
            MatchRule {
                dstports: ports(90, 80),
                ..rule(Action::Accept)
            },
            rule(Action::Drop),
        ];
        let pol = UnresolvedPolicy::BlockClient;
        let at = |dst: &str, port| {
            both(
                &rules,
                &[],
                pol,
                Packet::new(PacketProto::Tcp, ip(dst), port),
            )
            .rule
        };
        assert_eq!(at("10.0.0.1", 85), Some(0));
        assert_eq!(at("10.0.0.2", 85), Some(3));
        assert_eq!(at("::1", 85), Some(1));
    }

    #[test]
    fn unresolved_block_client() {
        let rules = vec![
            MatchRule {
                dst: host("nowhere.example"),
                ..rule(Action::Accept)
            },
            MatchRule {
                dst: host("empty.example"),
                ..rule(Action::Accept)
            },
            MatchRule {
                dst: host("nowhere.example"),
                ..rule(Action::Accept)
            },
            rule(Action::Accept),
        ];
        let calls = Cell::new(0);
        let counting = |n: &str| {
            calls.set(calls.get() + 1);
            resolver(n)
        };
        let c = Classifier::compile(&rules, &[], &counting, UnresolvedPolicy::BlockClient);
        assert_eq!(calls.get(), 2, "each distinct name resolved once");
        assert!(c.is_drop_all());
        assert_eq!(c.unresolved(), ["nowhere.example", "empty.example"]);
        let p = Packet::new(PacketProto::Tcp, ip("10.0.0.1"), 443);
        assert_eq!(c.lookup(p), Verdict::NO_MATCH);
        let l = LinearScan::new(&rules, &[], &resolver, UnresolvedPolicy::BlockClient);
        assert_eq!(l.lookup(p), Verdict::NO_MATCH);
        assert_eq!(l.unresolved(), c.unresolved());
    }

    #[test]
    fn unresolved_skip_accept() {
        let pol = UnresolvedPolicy::SkipAccept;
        let mut rules = vec![
            MatchRule {
                dst: host("nowhere.example"),
                ..rule(Action::Accept)
            },
            MatchRule {
                proto: Some(Proto::Tcp),
                dst: host("example.com"),
                ..rule(Action::Accept)
            },
            rule(Action::Drop),
        ];
        let c = Classifier::compile(&rules, &[], &resolver, pol);
        assert!(!c.is_drop_all());
        assert_eq!(c.unresolved(), ["nowhere.example"]);
        let p = Packet::new(PacketProto::Tcp, ip("1.2.3.4"), 443);
        assert_eq!(both(&rules, &[], pol, p).rule, Some(1));
        let p = Packet::new(PacketProto::Udp, ip("1.2.3.4"), 443);
        assert_eq!(both(&rules, &[], pol, p).rule, Some(2));

        // A drop rule on an unresolved name blocks the whole client, even where an earlier
        // accept rule would have matched.
        rules.insert(
            1,
            MatchRule {
                dst: host("empty.example"),
                ..rule(Action::Drop)
            },
        );
        let c = Classifier::compile(&rules, &[], &resolver, pol);
        assert!(c.is_drop_all());
        assert_eq!(c.unresolved(), ["nowhere.example", "empty.example"]);
        let p = Packet::new(PacketProto::Tcp, ip("1.2.3.4"), 443);
        assert_eq!(both(&rules, &[], pol, p), Verdict::NO_MATCH);
    }

    #[test]
    fn nested_prefixes_and_big_tables() {
        // A wide prefix with many port rules around narrower prefixes, plus an address-less
        // table large enough to get a radix index.
        let mut rules = Vec::new();
        for p in 0..40u16 {
            rules.push(MatchRule {
                proto: Some(Proto::Tcp),
                dstports: ports(p * 100, p * 100 + 50),
                ..rule(Action::Drop)
            });
            rules.push(MatchRule {
                dst: v4("10.0.0.0", 8),
                proto: Some(Proto::Udp),
                dstports: ports(p * 7, p * 7 + 3),
                ..rule(Action::Drop)
            });
            rules.push(MatchRule {
                dst: v4(&format!("10.{p}.0.0"), 16),
                dstports: ports(p, p),
                ..rule(Action::Accept)
            });
            rules.push(MatchRule {
                dst: v4(&format!("10.{p}.1.1"), 32),
                ..rule(Action::Accept)
            });
        }
        rules.push(rule(Action::Drop));
        let c = Classifier::compile(&rules, &[], &resolver, UnresolvedPolicy::BlockClient);
        let l = LinearScan::new(&rules, &[], &resolver, UnresolvedPolicy::BlockClient);
        for a in 0..45u8 {
            for b in [0u8, 1, 2] {
                for port in (0..4200u16).step_by(7).chain([0, 1, 49, 50, 51, 65535]) {
                    for proto in [PacketProto::Tcp, PacketProto::Udp, PacketProto::Icmp] {
                        let p = Packet::new(proto, Ipv4Addr::new(10, a, b, 1), port);
                        assert_eq!(c.lookup(p), l.lookup(p), "{p:?}");
                    }
                }
            }
        }
    }
}
