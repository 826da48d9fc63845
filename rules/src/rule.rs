//! The dom0 rule model (`qubes/firewall.py`): fields, validation and the three dom0 string forms.
//!
//! Every check here mirrors qubes-core-admin `qubes/firewall.py` (the `RuleOption` classes), in upstream's order, so the
//! first error a user sees is the one dom0 would have reported. The error texts are dom0's.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::py;

/// A rule that dom0 would refuse, with dom0's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError(pub String);

impl RuleError {
    pub fn new(msg: impl Into<String>) -> Self {
        RuleError(msg.into())
    }
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RuleError {}

fn err<T>(msg: impl Into<String>) -> Result<T, RuleError> {
    Err(RuleError::new(msg))
}

/// `RuleOption.__init__`'s character check, applied to the normalised value.
const SAFE_EXTRA: &[u8] = b":;,./-_[]";

fn check_safe(value: &str) -> Result<(), RuleError> {
    if value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || SAFE_EXTRA.contains(&b))
    {
        Ok(())
    } else {
        err("strange characters in rule")
    }
}

/// `accept` or `drop`. Refused traffic gets an ICMP admin-prohibited reply (section 3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Accept,
    Drop,
}

impl Action {
    pub fn parse(value: &str) -> Result<Self, RuleError> {
        check_safe(value)?;
        match value {
            "accept" => Ok(Action::Accept),
            "drop" => Ok(Action::Drop),
            // RuleChoice raises ValueError(value): the message is the bare value.
            other => err(other),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Drop => "drop",
        }
    }
}

/// The `proto=` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    pub fn parse(value: &str) -> Result<Self, RuleError> {
        check_safe(value)?;
        match value {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "icmp" => Ok(Proto::Icmp),
            other => err(other),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// The `specialtarget=` choice; only `dns` exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialTarget {
    Dns,
}

impl SpecialTarget {
    pub fn parse(value: &str) -> Result<Self, RuleError> {
        check_safe(value)?;
        match value {
            "dns" => Ok(SpecialTarget::Dns),
            other => err(other),
        }
    }
    pub fn as_str(self) -> &'static str {
        "dns"
    }
}

/// What a `dsthost` value turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DstAddr {
    /// An IPv4 network; the address keeps its host bits, as upstream does not check them.
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
    /// A host name, resolved by the netvm at apply time.
    Name,
}

/// `dsthost` (also written `dst4`, `dst6`, `dstname`).
///
/// `text` is upstream's `str()`: the input verbatim, plus `/32` or `/128` on a bare address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DstHost {
    text: String,
    addr: DstAddr,
}

/// glibc `inet_pton(AF_INET, ...)`: exactly four decimal octets, no leading zeros.
pub(crate) fn inet_pton4(s: &str) -> Option<Ipv4Addr> {
    // Rust's parser has the same grammar as glibc's inet_pton4 (it rejects leading zeros).
    s.parse().ok()
}

/// glibc `inet_pton(AF_INET6, ...)`.
pub(crate) fn inet_pton6(s: &str) -> Option<Ipv6Addr> {
    s.parse().ok()
}

impl DstHost {
    /// `DstHost(value, prefixlen)`. `prefixlen` is only passed by the v1 XML import; like
    /// upstream's `prefixlen or 128`, a zero there means "not given".
    pub fn parse(value: &str, prefixlen: Option<i128>) -> Result<Self, RuleError> {
        let prefixlen = prefixlen.filter(|&p| p != 0);
        let slashes = value.matches('/').count();
        if slashes > 1 {
            return err(format!("Too many /: {value}"));
        }
        let host = if slashes == 0 {
            if let Some(a) = inet_pton6(value) {
                let p = prefixlen.unwrap_or(128);
                if !(0..=128).contains(&p) {
                    return err("netmask for IPv6 must be between 0 and 128");
                }
                DstHost {
                    text: format!("{value}/{p}"),
                    addr: DstAddr::V6(a, p as u8),
                }
            } else if let Some(a) = inet_pton4(value) {
                if value.matches('.').count() != 3 {
                    return err("Invalid number of dots in IPv4 address");
                }
                let p = prefixlen.unwrap_or(32);
                if !(0..=32).contains(&p) {
                    return err("netmask for IPv4 must be between 0 and 32");
                }
                DstHost {
                    text: format!("{value}/{p}"),
                    addr: DstAddr::V4(a, p as u8),
                }
            } else {
                if !value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
                {
                    return err("Invalid hostname");
                }
                DstHost {
                    text: value.to_string(),
                    addr: DstAddr::Name,
                }
            }
        } else {
            let (host, len) = value.split_once('/').unwrap_or((value, ""));
            if !py::is_digit(len) {
                return err("bad prefix length");
            }
            // All digits: saturating is enough for the range checks below.
            let len_val = len.bytes().fold(0u32, |acc, b| {
                acc.saturating_mul(10).saturating_add(u32::from(b - b'0'))
            });
            if let Some(a) = inet_pton6(host) {
                if len_val > 128 {
                    return err("netmask for IPv6 must be <= 128");
                }
                DstHost {
                    text: value.to_string(),
                    addr: DstAddr::V6(a, len_val as u8),
                }
            } else if let Some(a) = inet_pton4(host) {
                if len_val > 32 {
                    return err("netmask for IPv4 must be <= 32");
                }
                if host.matches('.').count() != 3 {
                    return err("Invalid number of dots in IPv4 address");
                }
                DstHost {
                    text: value.to_string(),
                    addr: DstAddr::V4(a, len_val as u8),
                }
            } else {
                return err(format!("Invalid IP address: {host}"));
            }
        };
        check_safe(&host.text)?;
        Ok(host)
    }

    /// Upstream's `str()`: `1.2.3.0/24`, `2001:db8::1/128`, `qubes-os.org`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn addr(&self) -> DstAddr {
        self.addr
    }

    /// The QubesDB/API key: `dst4`, `dst6` or `dsthost`.
    pub fn kind(&self) -> &'static str {
        match self.addr {
            DstAddr::V4(..) => "dst4",
            DstAddr::V6(..) => "dst6",
            DstAddr::Name => "dsthost",
        }
    }

    pub fn prefixlen(&self) -> u8 {
        match self.addr {
            DstAddr::V4(_, p) | DstAddr::V6(_, p) => p,
            DstAddr::Name => 0,
        }
    }
}

/// `dstports`: one port or an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DstPorts {
    pub lo: u16,
    pub hi: u16,
}

impl DstPorts {
    pub fn parse(value: &str) -> Result<Self, RuleError> {
        Self::parse_with_max(value, 65535)
    }

    /// Shared with the client model, which lets 65536 through (reference 2.2).
    pub(crate) fn parse_range(value: &str, max: u128) -> Result<(u32, u32), RuleError> {
        let parts: Vec<&str> = match value.matches('-').count() {
            0 => vec![value, value],
            1 => value.splitn(2, '-').collect(),
            _ => return err(value),
        };
        let mut ports = [0u32; 2];
        let mut ints = Vec::with_capacity(2);
        for p in &parts {
            ints.push(py::int(p).map_err(RuleError)?);
        }
        for (slot, i) in ports.iter_mut().zip(&ints) {
            match i.in_range(max) {
                Some(v) => *slot = v as u32,
                None => return err("Ports out of range"),
            }
        }
        if ports[0] > ports[1] {
            return err("Invalid port range");
        }
        Ok((ports[0], ports[1]))
    }

    fn parse_with_max(value: &str, max: u128) -> Result<Self, RuleError> {
        let (lo, hi) = Self::parse_range(value, max)?;
        Ok(DstPorts {
            lo: lo as u16,
            hi: hi as u16,
        })
    }

    /// Short form used by `str()`, firewall.xml and the `qvm-firewall` table: `80`, `1-1024`.
    pub fn short(&self) -> String {
        if self.lo == self.hi {
            self.lo.to_string()
        } else {
            format!("{}-{}", self.lo, self.hi)
        }
    }

    /// Range form used by QubesDB and the admin API: always `lo-hi`.
    pub fn range(&self) -> String {
        format!("{}-{}", self.lo, self.hi)
    }

    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// `icmptype`: 0..=255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpType(pub u8);

impl IcmpType {
    pub fn parse(value: &str) -> Result<Self, RuleError> {
        if value.len() > 3 || !py::is_digit(value) {
            return err("bad ICMP type");
        }
        let v: u32 = value.parse().map_err(|_| RuleError::new("bad ICMP type"))?;
        if v > 255 {
            return err("ICMP type out of range");
        }
        Ok(IcmpType(v as u8))
    }
}

/// `expire`: UNIX time after which the rule no longer applies. The text is kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Expire {
    text: String,
    secs: u64,
}

/// Last second Python's `datetime` can represent (9999-12-31T23:59:59Z).
const DATETIME_MAX_SECS: u64 = 253_402_300_799;

impl Expire {
    pub fn parse(value: &str) -> Result<Self, RuleError> {
        check_safe(value)?;
        if !py::is_digit(value) {
            return err("bad expiration time");
        }
        let big = value.bytes().fold(0u128, |acc, b| {
            acc.saturating_mul(10).saturating_add(u128::from(b - b'0'))
        });
        // dom0 turns the value into a datetime; values it cannot represent fail there, with
        // Python's messages.
        if big > i64::MAX as u128 {
            return err("timestamp out of range for platform time_t");
        }
        let secs = big as u64;
        if secs > DATETIME_MAX_SECS {
            let year = year_of(secs);
            if year - 1900 > i64::from(i32::MAX) {
                return err("[Errno 75] Value too large for defined data type");
            }
            return err(format!("year {year} is out of range"));
        }
        Ok(Expire {
            text: value.to_string(),
            secs,
        })
    }

    /// An expiry `secs` seconds after the epoch, as `qvm-firewall expire=+N` computes it.
    pub fn at(secs: u64) -> Result<Self, RuleError> {
        Self::parse(&secs.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn secs(&self) -> u64 {
        self.secs
    }

    /// `datetime.fromtimestamp(v) < datetime.now()` with `now` in whole seconds.
    pub fn expired(&self, now: u64) -> bool {
        self.secs < now
    }
}

/// The proleptic Gregorian year of a UNIX time (Howard Hinnant's `civil_from_days`).
fn year_of(secs: u64) -> i64 {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(m <= 2)
}

/// `comment`: free text from a restricted character set, spaces allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Comment(String);

impl Comment {
    pub fn parse(value: &str) -> Result<Self, RuleError> {
        if value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || SAFE_EXTRA.contains(&b) || b == b' ')
        {
            Ok(Comment(value.to_string()))
        } else {
            err("strange characters comment")
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Rule properties by name, in upstream's declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Property {
    Action,
    Proto,
    Dsthost,
    Dstports,
    Icmptype,
    Specialtarget,
    Expire,
    Comment,
}

impl Property {
    pub const ALL: [Property; 8] = [
        Property::Action,
        Property::Proto,
        Property::Dsthost,
        Property::Dstports,
        Property::Icmptype,
        Property::Specialtarget,
        Property::Expire,
        Property::Comment,
    ];

    /// The property a key names; `dst4`, `dst6` and `dstname` are aliases of `dsthost`.
    pub fn from_key(key: &str) -> Option<Self> {
        Some(match key {
            "action" => Property::Action,
            "proto" => Property::Proto,
            "dsthost" | "dst4" | "dst6" | "dstname" => Property::Dsthost,
            "dstports" => Property::Dstports,
            "icmptype" => Property::Icmptype,
            "specialtarget" => Property::Specialtarget,
            "expire" => Property::Expire,
            "comment" => Property::Comment,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Property::Action => "action",
            Property::Proto => "proto",
            Property::Dsthost => "dsthost",
            Property::Dstports => "dstports",
            Property::Icmptype => "icmptype",
            Property::Specialtarget => "specialtarget",
            Property::Expire => "expire",
            Property::Comment => "comment",
        }
    }
}

/// One validated firewall rule, as dom0 holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    pub action: Option<Action>,
    pub dsthost: Option<DstHost>,
    pub proto: Option<Proto>,
    pub specialtarget: Option<SpecialTarget>,
    pub dstports: Option<DstPorts>,
    pub icmptype: Option<IcmpType>,
    pub expire: Option<Expire>,
    pub comment: Option<Comment>,
}

impl Rule {
    /// `Rule(action=accept)`: what dom0 uses when a qube has no firewall.xml.
    pub fn accept_all() -> Self {
        Rule {
            action: Some(Action::Accept),
            ..Rule::default()
        }
    }

    /// `Rule.from_api_string`: one admin-API line (reference 1.3).
    pub fn from_api_str(line: &str) -> Result<Self, RuleError> {
        let (options, comment) = match line.find("comment=") {
            Some(i) => (&line[..i], &line[i + "comment=".len()..]),
            None => (line, ""),
        };
        let mut kwargs: Vec<(Property, &str)> = Vec::new();
        if !comment.is_empty() {
            kwargs.push((Property::Comment, comment));
        }
        for opt in py::strip(options).split(' ') {
            let Some((key, value)) = opt.split_once('=') else {
                return err("not enough values to unpack (expected 2, got 1)");
            };
            let prop = match Property::from_key(key) {
                // `comment` is only reachable through the partition above.
                Some(p) if p != Property::Comment || key != "comment" => p,
                _ => return err("Unknown firewall option"),
            };
            if kwargs.iter().any(|(p, _)| *p == prop) {
                return err(format!("Option '{}' already set", prop.name()));
            }
            kwargs.push((prop, value));
        }
        Self::from_properties(kwargs)
    }

    /// Builds a rule from `(property, value)` pairs, validating each value in the given order
    /// and then the cross-field constraints, as `Rule(**kwargs)` does.
    pub fn from_properties<'a, I>(props: I) -> Result<Self, RuleError>
    where
        I: IntoIterator<Item = (Property, &'a str)>,
    {
        let mut rule = Rule::default();
        for (prop, value) in props {
            rule.set(prop, value)?;
        }
        rule.check()?;
        Ok(rule)
    }

    /// Sets one property from its text, without the cross-field checks.
    pub fn set(&mut self, prop: Property, value: &str) -> Result<(), RuleError> {
        match prop {
            Property::Action => self.action = Some(Action::parse(value)?),
            Property::Proto => self.proto = Some(Proto::parse(value)?),
            Property::Dsthost => self.dsthost = Some(DstHost::parse(value, None)?),
            Property::Dstports => self.dstports = Some(DstPorts::parse(value)?),
            Property::Icmptype => self.icmptype = Some(IcmpType::parse(value)?),
            Property::Specialtarget => self.specialtarget = Some(SpecialTarget::parse(value)?),
            Property::Expire => self.expire = Some(Expire::parse(value)?),
            Property::Comment => self.comment = Some(Comment::parse(value)?),
        }
        Ok(())
    }

    /// The checks `Rule.__init__` runs once all properties are set.
    pub fn check(&self) -> Result<(), RuleError> {
        if self.dstports.is_some() && !matches!(self.proto, Some(Proto::Tcp | Proto::Udp)) {
            return err("dstports valid only for 'tcp' and 'udp' protocols");
        }
        if self.icmptype.is_some() && self.proto != Some(Proto::Icmp) {
            return err("icmptype valid only for 'icmp' protocol");
        }
        if self.action.is_none() {
            return err("Required property 'action' not set");
        }
        Ok(())
    }

    /// The action; every validated rule has one.
    pub fn action(&self) -> Action {
        self.action.unwrap_or(Action::Drop)
    }

    pub fn is_expired(&self, now: u64) -> bool {
        self.expire.as_ref().is_some_and(|e| e.expired(now))
    }

    /// The QubesDB form (`Rule.rule`): `action dst* proto specialtarget dstports icmptype`,
    /// no expire and no comment. `None` once expired.
    pub fn qubesdb_rule(&self, now: u64) -> Option<String> {
        if self.is_expired(now) {
            return None;
        }
        Some(self.qubesdb_form())
    }

    /// The QubesDB form regardless of expiry.
    pub fn qubesdb_form(&self) -> String {
        let mut out = format!("action={}", self.action().as_str());
        self.push_match(&mut out);
        out
    }

    fn push_match(&self, out: &mut String) {
        if let Some(h) = &self.dsthost {
            push_kv(out, h.kind(), h.as_str());
        }
        if let Some(p) = self.proto {
            push_kv(out, "proto", p.as_str());
        }
        if let Some(s) = self.specialtarget {
            push_kv(out, "specialtarget", s.as_str());
        }
        if let Some(p) = self.dstports {
            push_kv(out, "dstports", &p.range());
        }
        if let Some(t) = self.icmptype {
            push_kv(out, "icmptype", &t.0.to_string());
        }
    }

    /// The admin-API form (`Rule.api_rule`, what `admin.vm.firewall.Get` returns):
    /// `action expire dst* proto specialtarget dstports icmptype comment`. `None` once expired.
    pub fn api_rule(&self, now: u64) -> Option<String> {
        if self.is_expired(now) {
            return None;
        }
        Some(self.api_form())
    }

    /// The admin-API form regardless of expiry.
    pub fn api_form(&self) -> String {
        let mut out = format!("action={}", self.action().as_str());
        if let Some(e) = &self.expire {
            push_kv(&mut out, "expire", e.as_str());
        }
        self.push_match(&mut out);
        if let Some(c) = &self.comment {
            push_kv(&mut out, "comment", c.as_str());
        }
        out
    }

    /// The properties firewall.xml stores, in its order:
    /// `action comment expire dsthost proto specialtarget dstports icmptype`.
    pub fn xml_properties(&self) -> Vec<(Property, String)> {
        let mut v = vec![(Property::Action, self.action().as_str().to_string())];
        if let Some(c) = &self.comment {
            v.push((Property::Comment, c.as_str().to_string()));
        }
        if let Some(e) = &self.expire {
            v.push((Property::Expire, e.as_str().to_string()));
        }
        if let Some(h) = &self.dsthost {
            v.push((Property::Dsthost, h.as_str().to_string()));
        }
        if let Some(p) = self.proto {
            v.push((Property::Proto, p.as_str().to_string()));
        }
        if let Some(s) = self.specialtarget {
            v.push((Property::Specialtarget, s.as_str().to_string()));
        }
        if let Some(p) = self.dstports {
            v.push((Property::Dstports, p.short()));
        }
        if let Some(t) = self.icmptype {
            v.push((Property::Icmptype, t.0.to_string()));
        }
        v
    }

    /// Whether the rule goes into the QubesDB entries of an address family (reference 1.7):
    /// `dst4` rules only to 4, `dst6` rules only to 6, everything else to both.
    pub fn in_family(&self, family: Family) -> bool {
        match self.dsthost.as_ref().map(DstHost::addr) {
            Some(DstAddr::V4(..)) => family == Family::V4,
            Some(DstAddr::V6(..)) => family == Family::V6,
            _ => true,
        }
    }
}

fn push_kv(out: &mut String, k: &str, v: &str) {
    out.push(' ');
    out.push_str(k);
    out.push('=');
    out.push_str(v);
}

/// An IP address family, as QubesDB and the agent split rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "4" => Some(Family::V4),
            "6" => Some(Family::V6),
            _ => None,
        }
    }
    pub fn number(self) -> u8 {
        match self {
            Family::V4 => 4,
            Family::V6 => 6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn year_of_matches_calendar() {
        assert_eq!(year_of(0), 1970);
        assert_eq!(year_of(DATETIME_MAX_SECS), 9999);
        assert_eq!(year_of(DATETIME_MAX_SECS + 1), 10000);
        assert_eq!(year_of(99_999_999_999_999), 3_170_843);
    }

    #[test]
    fn expire_out_of_datetime_range_uses_python_text() {
        assert_eq!(
            Expire::parse("99999999999999").map_err(|e| e.0),
            Err("year 3170843 is out of range".to_string())
        );
        assert_eq!(
            Expire::parse("99999999999999999999").map_err(|e| e.0),
            Err("timestamp out of range for platform time_t".to_string())
        );
    }

    #[test]
    fn v1_netmask_zero_means_default() {
        let h = DstHost::parse("192.168.0.1", Some(0)).expect("valid");
        assert_eq!(h.as_str(), "192.168.0.1/32");
        let h = DstHost::parse("2001:db8::", Some(0)).expect("valid");
        assert_eq!(h.as_str(), "2001:db8::/128");
    }
}
