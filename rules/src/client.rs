//! The admin-client rule model (`qubesadmin/firewall.py`), used by `qvm-firewall`.
//!
//! The client parses what `admin.vm.firewall.Get` returns with looser checks than dom0 and
//! prints rules in its own order (`action proto dsthost dstports icmptype specialtarget expire
//! comment`, reference 1.4). Its quirks are reproduced (reference 2.2): ports up to 65536, `0`
//! prefix networks omitted from `rule`, the ICMP type kept as typed.

use crate::py;
use crate::rule::{inet_pton4, inet_pton6, DstPorts, RuleError};

fn err<T>(msg: impl Into<String>) -> Result<T, RuleError> {
    Err(RuleError::new(msg))
}

fn choice(value: &str, allowed: &[&str]) -> Result<String, RuleError> {
    if allowed.contains(&value) {
        Ok(value.to_string())
    } else {
        err(value)
    }
}

/// The client's `DstHost`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHost {
    /// `str()`: the value with `/prefix` added to a bare address.
    pub text: String,
    /// `4`, `6` or `host`.
    pub kind: &'static str,
    pub prefixlen: u32,
}

impl ClientHost {
    pub fn parse(value: &str) -> Result<Self, RuleError> {
        let slashes = value.matches('/').count();
        if slashes > 1 {
            return err(format!("Too many /: {value}"));
        }
        if slashes == 0 {
            if inet_pton6(value).is_some() {
                return Ok(ClientHost {
                    text: format!("{value}/128"),
                    kind: "6",
                    prefixlen: 128,
                });
            }
            if inet_pton4(value).is_some() {
                return Ok(ClientHost {
                    text: format!("{value}/32"),
                    kind: "4",
                    prefixlen: 32,
                });
            }
            if !value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
            {
                return err("Invalid hostname");
            }
            return Ok(ClientHost {
                text: value.to_string(),
                kind: "host",
                prefixlen: 0,
            });
        }
        let (host, len) = value.split_once('/').unwrap_or((value, ""));
        let len = py::int(len).map_err(RuleError)?;
        if len.negative && len.magnitude != 0 {
            return err("netmask must be non-negative");
        }
        let prefixlen = len.magnitude.min(u128::from(u32::MAX)) as u32;
        let kind = if inet_pton6(host).is_some() {
            if prefixlen > 128 {
                return err("netmask for IPv6 must be <= 128");
            }
            "6"
        } else if inet_pton4(host).is_some() {
            if prefixlen > 32 {
                return err("netmask for IPv4 must be <= 32");
            }
            "4"
        } else {
            return err(format!("Invalid IP address: {host}"));
        };
        Ok(ClientHost {
            text: value.to_string(),
            kind,
            prefixlen,
        })
    }

    /// `DstHost.rule`: `dst4=`/`dst6=`/`dsthost=`, or nothing for a `/0` network.
    pub fn rule(&self) -> Option<String> {
        match self.kind {
            "host" => Some(format!("dsthost={}", self.text)),
            _ if self.prefixlen == 0 => None,
            k => Some(format!("dst{k}={}", self.text)),
        }
    }
}

/// One rule as `qvm-firewall` holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRule {
    pub action: Option<String>,
    pub proto: Option<String>,
    pub dsthost: Option<ClientHost>,
    /// `(lo, hi)`; up to 65536 on the client.
    pub dstports: Option<(u32, u32)>,
    /// Kept as typed (`08` stays `08`).
    pub icmptype: Option<String>,
    pub specialtarget: Option<String>,
    /// Kept as typed; `secs` for display.
    pub expire: Option<(String, i128)>,
    pub comment: Option<String>,
}

/// The keys the client accepts, in the order it applies them.
const CLIENT_ELEMENTS: [&str; 10] = [
    "action",
    "proto",
    "dsthost",
    "dst4",
    "dst6",
    "specialtarget",
    "dstports",
    "icmptype",
    "expire",
    "comment",
];

impl ClientRule {
    /// `Rule(rule_str)`: one line of `admin.vm.firewall.Get` output.
    pub fn parse(line: &str) -> Result<Self, RuleError> {
        let (options, comment) = match line.find("comment=") {
            Some(i) => (&line[..i], &line[i + "comment=".len()..]),
            None => (line, ""),
        };
        let mut kwargs: Vec<(String, String)> = Vec::new();
        for (i, opt) in options.split(' ').filter(|o| !o.is_empty()).enumerate() {
            let Some((k, v)) = opt.split_once('=') else {
                return err(format!(
                    "dictionary update sequence element #{i} has length 1; 2 is required"
                ));
            };
            set_kwarg(&mut kwargs, k, v);
        }
        if !comment.is_empty() {
            set_kwarg(&mut kwargs, "comment", comment);
        }
        Self::from_kwargs(kwargs)
    }

    /// `Rule(None, **kwargs)`: applies the known elements in the client's fixed order.
    pub fn from_kwargs(mut kwargs: Vec<(String, String)>) -> Result<Self, RuleError> {
        let mut rule = ClientRule::default();
        for name in CLIENT_ELEMENTS {
            let Some(pos) = kwargs.iter().position(|(k, _)| k == name) else {
                continue;
            };
            let (_, value) = kwargs.remove(pos);
            rule.set(name, &value)?;
        }
        if !kwargs.is_empty() {
            let items: Vec<String> = kwargs
                .iter()
                .map(|(k, v)| format!("{}: {}", py::repr(k), py::repr(v)))
                .collect();
            return err(format!("Unknown rule elements: {{{}}}", items.join(", ")));
        }
        if rule.action.is_none() {
            return err("missing action=");
        }
        Ok(rule)
    }

    fn set(&mut self, name: &str, value: &str) -> Result<(), RuleError> {
        match name {
            "action" => self.action = Some(choice(value, &["accept", "drop", "forward"])?),
            "proto" => {
                let p = choice(value, &["tcp", "udp", "icmp"])?;
                if p != "tcp" && p != "udp" {
                    self.dstports = None;
                }
                if p != "icmp" {
                    self.icmptype = None;
                }
                self.proto = Some(p);
            }
            "dsthost" | "dst4" | "dst6" => self.dsthost = Some(ClientHost::parse(value)?),
            "specialtarget" => self.specialtarget = Some(choice(value, &["dns"])?),
            "dstports" => {
                if !matches!(self.proto.as_deref(), Some("tcp" | "udp")) {
                    return err("dstports valid only for 'tcp' and 'udp' protocols");
                }
                self.dstports = Some(DstPorts::parse_range(value, 65536)?);
            }
            "icmptype" => {
                if self.proto.as_deref() != Some("icmp") {
                    return err("icmptype valid only for 'icmp' protocol");
                }
                let v = py::int(value).map_err(RuleError)?;
                if v.in_range(255).is_none() {
                    return err("ICMP type out of range");
                }
                self.icmptype = Some(value.to_string());
            }
            "expire" => {
                let v = py::int(value).map_err(RuleError)?;
                let secs = if v.negative {
                    -(v.magnitude.min(i128::MAX as u128) as i128)
                } else {
                    v.magnitude.min(i128::MAX as u128) as i128
                };
                self.expire = Some((value.to_string(), secs));
            }
            "comment" => self.comment = Some(value.to_string()),
            _ => return err(format!("Unknown rule elements: {{{}}}", py::repr(name))),
        }
        Ok(())
    }

    /// The client's `rule` string: what `qvm-firewall --raw list` prints and what the client
    /// sends to `admin.vm.firewall.Set`.
    pub fn rule(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if let Some(a) = &self.action {
            parts.push(format!("action={a}"));
        }
        if let Some(p) = &self.proto {
            parts.push(format!("proto={p}"));
        }
        if let Some(r) = self.dsthost.as_ref().and_then(ClientHost::rule) {
            parts.push(r);
        }
        if let Some((lo, hi)) = self.dstports {
            parts.push(format!("dstports={lo}-{hi}"));
        }
        if let Some(t) = &self.icmptype {
            parts.push(format!("icmptype={t}"));
        }
        if let Some(s) = &self.specialtarget {
            parts.push(format!("specialtarget={s}"));
        }
        if let Some((e, _)) = &self.expire {
            parts.push(format!("expire={e}"));
        }
        if let Some(c) = &self.comment {
            parts.push(format!("comment={c}"));
        }
        parts.join(" ")
    }

    /// The `qvm-firewall list` table cells after `NO`:
    /// ACTION HOST PROTOCOL PORT(S) SPECIAL TARGET ICMP TYPE EXPIRE COMMENT.
    pub fn table_cells(&self, now: i128) -> [String; 8] {
        let dash = || "-".to_string();
        [
            self.action.clone().unwrap_or_else(dash),
            self.dsthost
                .as_ref()
                .map(|h| h.text.clone())
                .unwrap_or_else(dash),
            self.proto.clone().unwrap_or_else(dash),
            self.dstports
                .map(|(lo, hi)| {
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo}-{hi}")
                    }
                })
                .unwrap_or_else(dash),
            self.specialtarget.clone().unwrap_or_else(dash),
            self.icmptype.clone().unwrap_or_else(dash),
            self.expire
                .as_ref()
                .map(|(_, secs)| format!("{:+}s", secs - now))
                .unwrap_or_else(dash),
            self.comment.clone().unwrap_or_else(dash),
        ]
    }
}

fn set_kwarg(kwargs: &mut Vec<(String, String)>, k: &str, v: &str) {
    if let Some(slot) = kwargs.iter_mut().find(|(ek, _)| ek == k) {
        slot.1 = v.to_string();
    } else {
        kwargs.push((k.to_string(), v.to_string()));
    }
}

/// `qubesadmin.tools.print_table` (`column -t -s $'\x1f'`): columns padded to their widest
/// cell, two spaces between columns, the last column not padded.
pub fn format_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The header of `qvm-firewall list`.
pub const TABLE_HEADER: [&str; 9] = [
    "NO",
    "ACTION",
    "HOST",
    "PROTOCOL",
    "PORT(S)",
    "SPECIAL TARGET",
    "ICMP TYPE",
    "EXPIRE",
    "COMMENT",
];

/// The whole `qvm-firewall list` table for a rule list.
pub fn rules_table(rules: &[ClientRule], now: i128) -> String {
    let mut rows = vec![TABLE_HEADER.iter().map(|s| s.to_string()).collect()];
    for (i, r) in rules.iter().enumerate() {
        let mut row = vec![i.to_string()];
        row.extend(r.table_cells(now));
        rows.push(row);
    }
    format_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_table_example() {
        let rules: Vec<ClientRule> = [
            "action=accept dsthost=qubes-os.org proto=tcp dstports=443-443",
            "action=drop proto=icmp icmptype=8",
            "action=accept specialtarget=dns comment=Allow DNS",
        ]
        .iter()
        .map(|l| ClientRule::parse(l).expect("valid"))
        .collect();
        let expected = "\
NO  ACTION  HOST          PROTOCOL  PORT(S)  SPECIAL TARGET  ICMP TYPE  EXPIRE  COMMENT
0   accept  qubes-os.org  tcp       443      -               -          -       -
1   drop    -             icmp      -        -               8          -       -
2   accept  -             -         -        dns             -          -       Allow DNS
";
        assert_eq!(rules_table(&rules, 0), expected);
    }

    #[test]
    fn client_quirks() {
        let r = ClientRule::parse("action=accept dst4=0.0.0.0/0").expect("valid");
        assert_eq!(r.rule(), "action=accept");
        let r = ClientRule::parse("action=accept proto=tcp dstports=65536").expect("valid");
        assert_eq!(r.rule(), "action=accept proto=tcp dstports=65536-65536");
        let r = ClientRule::parse("action=accept dsthost=qubes-os.org").expect("valid");
        assert_eq!(r.rule(), "action=accept dsthost=qubes-os.org");
        assert_eq!(
            ClientRule::parse("proto=tcp").map_err(|e| e.0),
            Err("missing action=".into())
        );
        assert_eq!(
            ClientRule::parse("action=accept foo=bar").map_err(|e| e.0),
            Err("Unknown rule elements: {'foo': 'bar'}".into())
        );
    }

    #[test]
    fn client_order_differs_from_dom0() {
        let r = ClientRule::parse(
            "action=accept expire=2063292452 dst4=1.2.3.0/24 proto=tcp dstports=443-443 comment=x y",
        )
        .expect("valid");
        assert_eq!(
            r.rule(),
            "action=accept proto=tcp dst4=1.2.3.0/24 dstports=443-443 expire=2063292452 comment=x y"
        );
    }

    #[test]
    fn expire_shows_relative_seconds() {
        let r = ClientRule::parse("action=accept expire=1000").expect("valid");
        assert_eq!(r.table_cells(400)[6], "+600s");
        assert_eq!(r.table_cells(1005)[6], "-5s");
    }
}
