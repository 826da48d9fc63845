//! `qubes-rules qubesdb` and `qubes-rules nft` as a user pipes them.

use std::io::Write;
use std::process::{Command, Stdio};

fn qubes_rules(args: &[&str], input: &str) -> (String, String, i32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qubes-rules"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qubes-rules");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// Reference 1.7's verified example, with the expired rule expired at `--now`.
const RULES: &str = "action=drop dst6=2001:db8::/32
action=accept dst4=10.0.0.0/8 proto=tcp dstports=22
action=drop proto=udp expire=1000
action=accept specialtarget=dns
action=accept dsthost=qubes-os.org comment=hi there
action=drop
";

#[test]
fn qubesdb_entries_per_family() {
    let (out, _, code) = qubes_rules(&["qubesdb", "--family", "4", "--now", "2000"], RULES);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "policy drop
0001 action=accept dst4=10.0.0.0/8 proto=tcp dstports=22-22
0003 action=accept specialtarget=dns
0004 action=accept dsthost=qubes-os.org
0005 action=drop
"
    );
    let (out, _, code) = qubes_rules(
        &[
            "qubesdb",
            "--family",
            "6",
            "--now",
            "2000",
            "--ip",
            "fd09:24ef:4179::a89:3",
        ],
        RULES,
    );
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "/qubes-firewall/fd09:24ef:4179::a89:3/policy drop
/qubes-firewall/fd09:24ef:4179::a89:3/0000 action=drop dst6=2001:db8::/32
/qubes-firewall/fd09:24ef:4179::a89:3/0003 action=accept specialtarget=dns
/qubes-firewall/fd09:24ef:4179::a89:3/0004 action=accept dsthost=qubes-os.org
/qubes-firewall/fd09:24ef:4179::a89:3/0005 action=drop
"
    );
}

#[test]
fn qubesdb_refuses_the_whole_list_on_one_bad_line() {
    let (out, err, code) = qubes_rules(
        &["qubesdb", "--family", "4"],
        "action=accept\naction=accept proto=tcp dstports=99999\n",
    );
    assert_eq!(code, 1);
    assert!(out.is_empty(), "nothing printed: {out}");
    assert!(err.contains("line 2: Ports out of range"), "{err}");
}

#[test]
fn nft_from_qubesdb_entries() {
    let (qdb, _, _) = qubes_rules(&["qubesdb", "--family", "4", "--now", "2000"], RULES);
    let (out, err, code) = qubes_rules(
        &[
            "nft",
            "--family",
            "4",
            "--ip",
            "10.137.0.5",
            "--dns",
            "10.139.1.1,10.139.1.2,fd09::1",
            "--resolve",
            "qubes-os.org=203.0.113.7",
            "--resolve",
            "qubes-os.org=2001:db8::7",
        ],
        &qdb,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "flush set ip qubes-firewall dns-addr
add element ip qubes-firewall dns-addr { 10.139.1.1, 10.139.1.2 }
flush chain ip qubes-firewall qbs-10-137-0-5
table ip qubes-firewall {
  chain qbs-10-137-0-5 {
    ip protocol tcp ip daddr 10.0.0.0/8 tcp dport 22 accept
    ip daddr @dns-addr tcp dport 53 accept
    ip daddr @dns-addr udp dport 53 accept
    ip daddr { 203.0.113.7/32 } accept
    reject with icmp type admin-prohibited
    reject with icmp type admin-prohibited
  }
}
"
    );
}

#[test]
fn nft_names_the_chain_from_the_ip_text_as_given() {
    // The agent (qubesagent/firewall.py `chain_for_addr`) uses the QubesDB key text
    // verbatim: only '.' and ':' become '-'; no compression, no case folding.
    for (ip, family, chain) in [
        ("fd09:24ef:4179:0000::3", "6", "qbs-fd09-24ef-4179-0000--3"),
        ("fd09:24ef:4179::a89:3", "6", "qbs-fd09-24ef-4179--a89-3"),
        ("FD09:24EF:4179::A89:3", "6", "qbs-FD09-24EF-4179--A89-3"),
        (
            "fd09:24ef:4179:0:0:0:a89:3",
            "6",
            "qbs-fd09-24ef-4179-0-0-0-a89-3",
        ),
        ("10.137.0.5", "4", "qbs-10-137-0-5"),
    ] {
        let (out, err, code) = qubes_rules(
            &["nft", "--family", family, "--ip", ip],
            "policy drop\n0000 action=accept dpi=NO\n",
        );
        assert_eq!(code, 1, "{ip}: {err}");
        assert!(
            out.contains(&format!("  chain {chain} {{\n")),
            "{ip}: {out}"
        );
        let p = if family == "4" { "ip" } else { "ip6" };
        assert!(
            out.contains(&format!("flush chain {p} qubes-firewall {chain}\n")),
            "{ip}: {out}"
        );
        // The parse failure message names the client by the same text.
        assert!(
            err.starts_with(&format!("Failed to parse rules for {ip} (")),
            "{ip}: {err}"
        );
    }
}

#[test]
fn nft_ip_must_be_an_address() {
    let (_, err, code) = qubes_rules(&["nft", "--family", "6", "--ip", "fd09::g"], "");
    assert_eq!(code, 2);
    assert!(err.contains("\"fd09::g\" is not an IP address"), "{err}");
}

#[test]
fn nft_blocks_the_client_when_rules_do_not_parse() {
    for (input, why) in [
        ("0000 action=accept\n", "No 'policy' defined"),
        (
            "policy drop\n0000 action=accept dsthost=unknown.example\n",
            "Failed to resolve unknown.example: [Errno -2] Name or service not known",
        ),
        (
            "policy drop\n0000 action=accept dpi=NO\n",
            "Unsupported rule option(s): {'dpi'}",
        ),
    ] {
        let (out, err, code) = qubes_rules(
            &["nft", "--family", "4", "--chain", "qbs-10-137-0-9"],
            input,
        );
        assert_eq!(code, 1, "{input}");
        assert_eq!(
            err.trim_end(),
            format!("Failed to parse rules for qbs-10-137-0-9 ({why}), blocking traffic")
        );
        assert!(
            out.ends_with(
                "  chain qbs-10-137-0-9 {\n    reject with icmp type admin-prohibited\n  }\n}\n"
            ),
            "{out}"
        );
    }
}

#[test]
fn bad_arguments_name_the_problem() {
    let (_, err, code) = qubes_rules(&["qubesdb", "--family", "5"], "");
    assert_eq!(code, 2);
    assert!(err.contains("address family must be 4 or 6"), "{err}");
    let (_, err, code) = qubes_rules(
        &[
            "nft",
            "--family",
            "4",
            "--chain",
            "c",
            "--resolve",
            "x=notanip",
        ],
        "",
    );
    assert_eq!(code, 2);
    assert!(err.contains("is not an IP address"), "{err}");
}
