//! Reference section 7.1: dom0's answer for each rule line, through the library and through
//! `qubes-rules check` as a user runs it.

use std::io::Write;
use std::process::{Command, Stdio};

use qubes_rules::{DstHost, Rule};

/// A time between the expired and the future `expire` values used below.
const NOW: u64 = 1_800_000_000;

/// `(input, expected)`: `ok <api_rule> | <qubesdb rule>`, or `error <message>`.
const CASES: &[(&str, &str)] = &[
    // 7.1 rows as listed.
    ("action=accept", "ok action=accept | action=accept"),
    (
        "action=accept proto=tcp dstports=80",
        "ok action=accept proto=tcp dstports=80-80 | action=accept proto=tcp dstports=80-80",
    ),
    (
        "action=accept dst4=192.168.0.0/24 proto=tcp dstports=443",
        "ok action=accept dst4=192.168.0.0/24 proto=tcp dstports=443-443 | action=accept dst4=192.168.0.0/24 proto=tcp dstports=443-443",
    ),
    (
        "action=accept dst6=2001:db8::1",
        "ok action=accept dst6=2001:db8::1/128 | action=accept dst6=2001:db8::1/128",
    ),
    (
        "action=accept dstname=qubes-os.org",
        "ok action=accept dsthost=qubes-os.org | action=accept dsthost=qubes-os.org",
    ),
    (
        "action=drop proto=tcp specialtarget=dns",
        "ok action=drop proto=tcp specialtarget=dns | action=drop proto=tcp specialtarget=dns",
    ),
    (
        "action=accept expire=2063292452 proto=tcp comment=Some comment, with spaces",
        "ok action=accept expire=2063292452 proto=tcp comment=Some comment, with spaces | action=accept proto=tcp",
    ),
    (
        "action=accept dst4=0.0.0.0/0",
        "ok action=accept dst4=0.0.0.0/0 | action=accept dst4=0.0.0.0/0",
    ),
    (
        "action=accept proto=tcp dstports=0",
        "ok action=accept proto=tcp dstports=0-0 | action=accept proto=tcp dstports=0-0",
    ),
    (
        "action=accept dsthost=1.2.3",
        "ok action=accept dsthost=1.2.3 | action=accept dsthost=1.2.3",
    ),
    (
        "action=accept dsthost=1.2.3.4/08",
        "ok action=accept dst4=1.2.3.4/08 | action=accept dst4=1.2.3.4/08",
    ),
    (
        "proto=tcp dstports=1-1024",
        "error Required property 'action' not set",
    ),
    (
        "action=accept proto=tcp dstports=1-1024 action=drop",
        "error Option 'action' already set",
    ),
    ("action=reject", "error reject"),
    ("action=ACCEPT", "error ACCEPT"),
    (
        "action=accept dstports=80",
        "error dstports valid only for 'tcp' and 'udp' protocols",
    ),
    (
        "action=accept proto=tcp icmptype=8",
        "error icmptype valid only for 'icmp' protocol",
    ),
    (
        "action=accept icmptype=8",
        "error icmptype valid only for 'icmp' protocol",
    ),
    ("action=accept proto=tcp dstports=100-20", "error Invalid port range"),
    (
        "action=accept proto=tcp dstports=http",
        "error invalid literal for int() with base 10: 'http'",
    ),
    ("action=accept proto=icmp icmptype=0255", "error bad ICMP type"),
    ("action=accept proto=icmp icmptype=-1", "error bad ICMP type"),
    ("action=accept dsthost=127/8", "error Invalid IP address: 127"),
    (
        "action=accept dsthost=137.327.0.0/16",
        "error Invalid IP address: 137.327.0.0",
    ),
    (
        "action=accept dsthost=2001:abcd:efgh::3/128",
        "error Invalid IP address: 2001:abcd:efgh::3",
    ),
    (
        "action=accept dsthost=https://qubes-os.org",
        "error Too many /: https://qubes-os.org",
    ),
    (
        "action=accept dst4=1.2.3.4 dst6=::1",
        "error Option 'dsthost' already set",
    ),
    ("action=accept specialtarget=tor", "error tor"),
    ("action=accept expire=+300", "error strange characters in rule"),
    (
        "action=accept  proto=tcp",
        "error not enough values to unpack (expected 2, got 1)",
    ),
    ("", "error not enough values to unpack (expected 2, got 1)"),
    // Cases the rules of section 1.2 decide (the held-out rows are of this kind).
    ("action=drop", "ok action=drop | action=drop"),
    (
        "dstports=80 proto=udp action=accept",
        "ok action=accept proto=udp dstports=80-80 | action=accept proto=udp dstports=80-80",
    ),
    (
        "action=accept proto=tcp dstports=65536",
        "error Ports out of range",
    ),
    (
        "action=accept proto=tcp dstports=65535",
        "ok action=accept proto=tcp dstports=65535-65535 | action=accept proto=tcp dstports=65535-65535",
    ),
    (
        "action=accept proto=tcp dstports=+80",
        "ok action=accept proto=tcp dstports=80-80 | action=accept proto=tcp dstports=80-80",
    ),
    (
        "action=accept proto=tcp dstports=080-0443",
        "ok action=accept proto=tcp dstports=80-443 | action=accept proto=tcp dstports=80-443",
    ),
    ("action=accept proto=tcp dstports=1-2-3", "error 1-2-3"),
    (
        "action=accept proto=tcp dstports=",
        "error invalid literal for int() with base 10: ''",
    ),
    (
        "action=accept proto=tcp dstports=80-",
        "error invalid literal for int() with base 10: ''",
    ),
    (
        "action=accept proto=icmp icmptype=08",
        "ok action=accept proto=icmp icmptype=8 | action=accept proto=icmp icmptype=8",
    ),
    (
        "action=accept proto=icmp icmptype=256",
        "error ICMP type out of range",
    ),
    ("action=accept proto=icmp icmptype=", "error bad ICMP type"),
    ("action=accept proto=icmp icmptype=abcde", "error bad ICMP type"),
    (
        "action=accept dsthost=Qubes-OS.org",
        "error Invalid hostname",
    ),
    ("action=accept dsthost=*.qubes-os.org", "error Invalid hostname"),
    (
        "action=accept dsthost=www..x",
        "ok action=accept dsthost=www..x | action=accept dsthost=www..x",
    ),
    (
        "action=accept dsthost=under_score.example",
        "ok action=accept dsthost=under_score.example | action=accept dsthost=under_score.example",
    ),
    (
        "action=accept dsthost=127.0.0.1/32",
        "ok action=accept dst4=127.0.0.1/32 | action=accept dst4=127.0.0.1/32",
    ),
    (
        "action=accept dsthost=2001:abcd:efab::3/64",
        "ok action=accept dst6=2001:abcd:efab::3/64 | action=accept dst6=2001:abcd:efab::3/64",
    ),
    ("action=accept dst4=1.2.3.4/33", "error netmask for IPv4 must be <= 32"),
    ("action=accept dst6=::1/129", "error netmask for IPv6 must be <= 128"),
    ("action=accept dsthost=10.0.0.0/", "error bad prefix length"),
    ("action=accept dsthost=10.0.0.0/-1", "error bad prefix length"),
    ("action=accept dsthost=qubes-os.org/24", "error Invalid IP address: qubes-os.org"),
    (
        "action=accept dst4=qubes-os.org",
        "ok action=accept dsthost=qubes-os.org | action=accept dsthost=qubes-os.org",
    ),
    (
        "action=accept dst4=2001:db8::1",
        "ok action=accept dst6=2001:db8::1/128 | action=accept dst6=2001:db8::1/128",
    ),
    (
        "action=accept dsthost=a.b dsthost=c.d",
        "error Option 'dsthost' already set",
    ),
    ("action=accept foo=bar", "error Unknown firewall option"),
    ("action=reject foo=bar", "error Unknown firewall option"),
    ("action=accept expire=1.5", "error bad expiration time"),
    ("action=accept expire=abc", "error bad expiration time"),
    (
        "action=accept comment=a=b",
        "error strange characters comment",
    ),
    ("action=accept comment=", "ok action=accept | action=accept"),
    (
        "comment=first action=accept",
        "error not enough values to unpack (expected 2, got 1)",
    ),
    ("action=acc#ept", "error strange characters in rule"),
    ("action=accept specialtarget=DNS", "error DNS"),
    (
        "action=accept proto=tcp dstports=80 proto=udp",
        "error Option 'proto' already set",
    ),
    (
        "action=accept   ",
        "ok action=accept | action=accept",
    ),
    (
        "action=accept dst6=::ffff:1.2.3.4",
        "ok action=accept dst6=::ffff:1.2.3.4/128 | action=accept dst6=::ffff:1.2.3.4/128",
    ),
    ("action=accept dst4=01.2.3.4", "ok action=accept dsthost=01.2.3.4 | action=accept dsthost=01.2.3.4"),
    (
        "action=accept proto=tcp expire=2063292452 comment=x y  ",
        "ok action=accept expire=2063292452 proto=tcp comment=x y   | action=accept proto=tcp",
    ),
    // An expired rule is valid but applies nowhere.
    ("action=drop proto=udp expire=1499450306", "expired"),
];

fn library_answer(line: &str) -> String {
    match qubes_rules::firewall::check_line(line) {
        Ok(r) if r.is_expired(NOW) => "expired".to_string(),
        Ok(r) => format!(
            "ok {} | {}",
            r.api_rule(NOW).expect("not expired"),
            r.qubesdb_rule(NOW).expect("not expired")
        ),
        Err(e) => format!("error {e}"),
    }
}

#[test]
fn section_7_1_through_the_library() {
    for (input, expected) in CASES {
        assert_eq!(&library_answer(input), expected, "input {input:?}");
    }
}

fn run_check(format: &str, input: &str) -> (String, i32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qubes-rules"))
        .args(["check", "--format", format, "--now", &NOW.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn qubes-rules");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        String::from_utf8(out.stdout).expect("utf-8"),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
fn section_7_1_through_qubes_rules_check() {
    let input: String = CASES.iter().map(|(i, _)| format!("{i}\n")).collect();
    for (format, side) in [("api", 0), ("qdb", 1)] {
        let (out, code) = run_check(format, &input);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), CASES.len(), "one output line per input line");
        for ((input, expected), got) in CASES.iter().zip(&lines) {
            let want = match expected.strip_prefix("ok ") {
                Some(forms) => format!("ok {}", forms.split(" | ").nth(side).expect("form")),
                None => expected.to_string(),
            };
            assert_eq!(*got, want, "input {input:?} format {format}");
        }
        assert_eq!(code, 1, "some lines are errors");
    }
}

#[test]
fn check_exit_status_and_client_form() {
    let (out, code) = run_check(
        "client",
        "action=accept expire=2063292452 dst4=1.2.3.0/24 proto=tcp dstports=443 comment=x y\r\naction=drop\n",
    );
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "ok action=accept proto=tcp dst4=1.2.3.0/24 dstports=443-443 expire=2063292452 comment=x y\nok action=drop\n"
    );
    let (out, code) = run_check("api", "action=accept comment=caf\u{e9}\n");
    assert_eq!(out, "error Rules contains non-ASCII characters\n");
    assert_eq!(code, 1);
}

#[test]
fn serialisation_orders_of_section_1_4() {
    let r = Rule::from_api_str(
        "action=accept proto=tcp dstports=443 dsthost=1.2.3.0/24 expire=2063292452 comment=x y",
    )
    .expect("valid");
    assert_eq!(
        r.qubesdb_rule(NOW).as_deref(),
        Some("action=accept dst4=1.2.3.0/24 proto=tcp dstports=443-443")
    );
    assert_eq!(
        r.api_rule(NOW).as_deref(),
        Some("action=accept expire=2063292452 dst4=1.2.3.0/24 proto=tcp dstports=443-443 comment=x y")
    );
    let names: Vec<&str> = r.xml_properties().iter().map(|(p, _)| p.name()).collect();
    assert_eq!(
        names,
        ["action", "comment", "expire", "dsthost", "proto", "dstports"]
    );
}

#[test]
fn component_cases() {
    let h = DstHost::parse("127.0.0.1", None).expect("valid");
    assert_eq!(
        (h.kind(), h.prefixlen(), h.as_str()),
        ("dst4", 32, "127.0.0.1/32")
    );
    assert_eq!(
        DstHost::parse("127.0.0.0", Some(8))
            .expect("valid")
            .as_str(),
        "127.0.0.0/8"
    );
    let h = DstHost::parse("2001:abcd:efab::", Some(64)).expect("valid");
    assert_eq!((h.kind(), h.as_str()), ("dst6", "2001:abcd:efab::/64"));
    for bad in [
        "2001:abcd:efab0123::3/128",
        "2001:abcd:efab:3/128",
        "2001:abcd:efab:a:a:a:a:a:a:3/128",
        "www  qubes-os.org",
    ] {
        assert!(DstHost::parse(bad, None).is_err(), "{bad}");
    }
    for bad in ["80 90", "", "1000000000000", "1-1000000000000"] {
        assert!(qubes_rules::DstPorts::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        qubes_rules::DstPorts::parse("80").expect("valid").short(),
        "80"
    );
    let r = Rule::from_api_str("action=accept expire=1463292452").expect("valid");
    assert!(r.is_expired(NOW));
    assert_eq!(r.qubesdb_rule(NOW), None);
    assert_eq!(r.api_form(), "action=accept expire=1463292452");
    let r = Rule::from_api_str("action=accept expire=2583292452").expect("valid");
    assert!(!r.is_expired(NOW));
}
