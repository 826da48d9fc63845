//! Property tests for the rule file formats: firewall.xml (qubes-core-admin `qubes/firewall.py`, `Firewall.save`/`load`) and
//! YAML rule files (docs/rule-files.md), and the idempotence of dom0's normalisation (`Rule.from_api_string`, `Rule.api_rule`).
//!
//! Rules are generated as admin-API lines built from valid components, so every generated line is
//! one dom0 accepts; the properties then check that no format loses or changes anything.

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use qubes_rules::{xml, yaml, Rule};

/// The "current time" for expiry; generated expiry times lie after it.
const NOW: u64 = 1_700_000_000;
/// The last expiry time dom0 can represent (9999-12-31T23:59:59Z).
const EXPIRE_MAX: u64 = 253_402_300_799;

/// 256 cases; `PROPTEST_CASES=N` asks for a longer run.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// A prefix length as text, sometimes with leading zeros (`/08` is kept verbatim by dom0).
fn prefix(max: u8) -> impl Strategy<Value = String> {
    (0..=max, 0usize..3).prop_map(|(p, zeros)| format!("{}{p}", "0".repeat(zeros)))
}

/// `dsthost=` under one of its four names, with an IPv4 or IPv6 network (bare or with a
/// prefix) or a host name.
fn dst() -> impl Strategy<Value = String> {
    let key = prop_oneof![Just("dsthost"), Just("dst4"), Just("dst6"), Just("dstname")];
    let v4 = (any::<[u8; 4]>(), proptest::option::of(prefix(32))).prop_map(|(a, p)| {
        let a = Ipv4Addr::from(a);
        match p {
            Some(p) => format!("{a}/{p}"),
            None => a.to_string(),
        }
    });
    let v6 = (
        any::<[u16; 8]>(),
        0usize..8,
        proptest::option::of(prefix(128)),
    )
        .prop_map(|(mut segs, zero_from, p)| {
            // Runs of zero segments, so the compressed `::` forms turn up.
            for s in segs.iter_mut().skip(zero_from).take(3) {
                *s = 0;
            }
            let a = Ipv6Addr::from(segs);
            match p {
                Some(p) => format!("{a}/{p}"),
                None => a.to_string(),
            }
        });
    let name = "[a-z0-9._-]{1,30}";
    (key, prop_oneof![v4, v6, name.prop_map(String::from)]).prop_map(|(k, v)| format!("{k}={v}"))
}

/// A port as the API accepts it: plain, with leading zeros or a `+`.
fn port() -> impl Strategy<Value = (u16, String)> {
    (any::<u16>(), 0usize..4).prop_map(|(p, style)| {
        let text = match style {
            1 => format!("0{p}"),
            2 => format!("+{p}"),
            _ => p.to_string(),
        };
        (p, text)
    })
}

/// `proto=` with matching `dstports=` / `icmptype=`, or nothing.
fn proto() -> impl Strategy<Value = Vec<String>> {
    let ports = proptest::option::of((port(), proptest::option::of(port()))).prop_map(|p| {
        p.map(|((lo, lo_text), hi)| match hi {
            Some((hi, hi_text)) if hi >= lo => format!("dstports={lo_text}-{hi_text}"),
            Some((_, hi_text)) => format!("dstports={hi_text}-{lo_text}"),
            None => format!("dstports={lo_text}"),
        })
    });
    let tcp_udp = (prop_oneof![Just("tcp"), Just("udp")], ports).prop_map(|(p, ports)| {
        let mut v = vec![format!("proto={p}")];
        v.extend(ports);
        v
    });
    let icmp = proptest::option::of((any::<u8>(), any::<bool>())).prop_map(|t| {
        let mut v = vec!["proto=icmp".to_string()];
        if let Some((t, pad)) = t {
            v.push(if pad && t < 100 {
                format!("icmptype=0{t}")
            } else {
                format!("icmptype={t}")
            });
        }
        v
    });
    prop_oneof![Just(Vec::new()), tcp_udp, icmp]
}

/// A valid admin-API line, its options in random order and the comment last.
fn api_line() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("accept"), Just("drop")],
        proptest::option::of(dst()),
        proto(),
        any::<bool>(),
        proptest::option::of((NOW + 1..=EXPIRE_MAX, 0usize..3)),
        proptest::option::of("[A-Za-z0-9:;,./_\\[\\] -]{1,40}"),
    )
        .prop_flat_map(|(action, dst, proto, dns, expire, comment)| {
            let mut opts = vec![format!("action={action}")];
            opts.extend(dst);
            opts.extend(proto);
            if dns {
                opts.push("specialtarget=dns".to_string());
            }
            if let Some((e, zeros)) = expire {
                opts.push(format!("expire={}{e}", "0".repeat(zeros)));
            }
            (Just(opts).prop_shuffle(), Just(comment))
        })
        .prop_map(|(opts, comment)| {
            let mut line = opts.join(" ");
            if let Some(c) = comment {
                line.push_str(" comment=");
                line.push_str(&c);
            }
            line
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    api_line().prop_map(|line| match Rule::from_api_str(&line) {
        Ok(rule) => rule,
        Err(e) => panic!("generated an invalid rule {line:?}: {e}"),
    })
}

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    proptest::collection::vec(rule(), 0..8)
}

/// Characters that matter to the XML and YAML grammars, for mutating valid files.
const NASTY: &[char] = &[
    '<', '>', '/', '"', '\'', '=', '&', ';', '#', ':', '-', ' ', '\n', '\t', '[', ']', '{', '}',
    '!', '?', '*', '|', '%', '@', 'a', '0', '\u{0}', '\u{feff}', 'é',
];

fn mutate(text: &str, edits: &[(usize, usize, bool)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(pos, c, insert) in edits {
        let c = NASTY[c % NASTY.len()];
        if chars.is_empty() {
            chars.push(c);
            continue;
        }
        let pos = pos % chars.len();
        if insert {
            chars.insert(pos, c);
        } else {
            chars[pos] = c;
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn xml_write_read_write_is_identity(rules in rules()) {
        let text = xml::write_v2(&rules, NOW);
        let back = xml::read(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &rules);
        prop_assert_eq!(xml::write_v2(&back, NOW), text);
    }

    #[test]
    fn yaml_write_read_is_identity(rules in rules()) {
        let text = yaml::write(&rules);
        let back = yaml::read(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &rules);
        prop_assert_eq!(yaml::write(&back), text);
    }

    #[test]
    fn normalisation_is_idempotent(rule in rule()) {
        let api = rule.api_form();
        let again = Rule::from_api_str(&api)
            .map_err(|e| TestCaseError::fail(format!("{e}: {api}")))?;
        prop_assert_eq!(&again, &rule);
        prop_assert_eq!(again.api_form(), api);
    }

    #[test]
    fn readers_never_panic_on_mutated_files(
        rules in rules(),
        edits in proptest::collection::vec((any::<usize>(), any::<usize>(), any::<bool>()), 1..6),
    ) {
        let _ = xml::read(&mutate(&xml::write_v2(&rules, NOW), &edits));
        let _ = yaml::read(&mutate(&yaml::write(&rules), &edits));
    }

    #[test]
    fn readers_never_panic_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = xml::read(&text);
        let _ = yaml::read(&text);
    }
}
