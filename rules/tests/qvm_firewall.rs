//! `qvm-firewall` end to end on a store directory: upstream's grammar, output and errors
//! (reference 2.2 and 7.4), and that a refused edit leaves firewall.xml untouched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const NOW: &str = "1800000000";

struct Out {
    stdout: String,
    stderr: String,
    code: i32,
}

fn qvm_firewall(store: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_qvm-firewall"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env("QUBES_FIREWALL_NOW", NOW)
        .env_remove("QUBES_FIREWALL_STORE")
        .output()
        .expect("run qvm-firewall");
    Out {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code().unwrap_or(-1),
    }
}

/// A store with qube `test-vm` holding the rules upstream's CLI tests start from.
fn store_with_upstream_rules() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = dir.path().join("appvms/test-vm");
    fs::create_dir_all(&vm).expect("mkdir");
    let root = dir.path().to_path_buf();
    for args in [
        &["test-vm", "reset"][..],
        &["test-vm", "del", "--rule-no", "0"],
        &["test-vm", "add", "accept", "qubes-os.org"],
        &["test-vm", "add", "drop", "proto=icmp"],
    ] {
        let o = qvm_firewall(&root, args);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
    }
    (dir, root)
}

fn firewall_xml(root: &Path) -> String {
    fs::read_to_string(root.join("appvms/test-vm/firewall.xml")).expect("firewall.xml")
}

#[test]
fn list_table_and_raw() {
    let (_d, root) = store_with_upstream_rules();
    let o = qvm_firewall(&root, &["test-vm", "list"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout,
        "NO  ACTION  HOST          PROTOCOL  PORT(S)  SPECIAL TARGET  ICMP TYPE  EXPIRE  COMMENT\n\
         0   accept  qubes-os.org  -         -        -               -          -       -\n\
         1   drop    -             icmp      -        -               -          -       -\n"
    );
    // No command means list.
    assert_eq!(qvm_firewall(&root, &["test-vm"]).stdout, o.stdout);
    for args in [
        &["--raw", "test-vm", "list"][..],
        &["test-vm", "--raw", "list"],
        &["--raw", "--reload", "test-vm", "list"],
    ] {
        let o = qvm_firewall(&root, args);
        assert_eq!(o.code, 0);
        assert_eq!(
            o.stdout, "action=accept dsthost=qubes-os.org\naction=drop proto=icmp\n",
            "{args:?}"
        );
    }
}

#[test]
fn add_append_and_before() {
    let (_d, root) = store_with_upstream_rules();
    let o = qvm_firewall(
        &root,
        &[
            "test-vm",
            "add",
            "accept",
            "192.168.0.0/24",
            "comment=Allow LAN",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        qvm_firewall(&root, &["--raw", "test-vm", "list"]).stdout,
        "action=accept dsthost=qubes-os.org\naction=drop proto=icmp\naction=accept dst4=192.168.0.0/24 comment=Allow LAN\n"
    );

    let (_d, root) = store_with_upstream_rules();
    let o = qvm_firewall(
        &root,
        &[
            "test-vm",
            "add",
            "--before",
            "1",
            "accept",
            "192.168.0.0/24",
            "comment=Allow LAN",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        qvm_firewall(&root, &["--raw", "test-vm", "list"]).stdout,
        "action=accept dsthost=qubes-os.org\naction=accept dst4=192.168.0.0/24 comment=Allow LAN\naction=drop proto=icmp\n"
    );
    // dom0 stores it in firewall.xml v2, dsthost with its prefix, comment before the match.
    assert_eq!(
        firewall_xml(&root),
        r#"<firewall version="2">
  <rules>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="dsthost">qubes-os.org</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="comment">Allow LAN</property>
        <property name="dsthost">192.168.0.0/24</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">drop</property>
        <property name="proto">icmp</property>
      </properties>
    </rule>
  </rules>
</firewall>
"#
    );
}

#[test]
fn del_by_number_and_by_rule() {
    for args in [
        &["test-vm", "del", "--rule-no", "1"][..],
        &["test-vm", "del", "drop", "proto=icmp"],
        &["test-vm", "del", "--rule-no=-1"],
    ] {
        let (_d, root) = store_with_upstream_rules();
        let o = qvm_firewall(&root, args);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        assert_eq!(
            qvm_firewall(&root, &["--raw", "test-vm", "list"]).stdout,
            "action=accept dsthost=qubes-os.org\n",
            "{args:?}"
        );
    }
}

#[test]
fn reset_writes_accept_all() {
    let (_d, root) = store_with_upstream_rules();
    assert_eq!(qvm_firewall(&root, &["test-vm", "reset"]).code, 0);
    assert_eq!(
        qvm_firewall(&root, &["--raw", "test-vm", "list"]).stdout,
        "action=accept\n"
    );
}

#[test]
fn default_rules_without_firewall_xml() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(dir.path().join("appvms/work")).expect("mkdir");
    let o = qvm_firewall(dir.path(), &["--raw", "work", "list"]);
    assert_eq!((o.code, o.stdout.as_str()), (0, "action=accept\n"));
}

#[test]
fn expire_plus_seconds_and_table() {
    let (_d, root) = store_with_upstream_rules();
    let o = qvm_firewall(
        &root,
        &["test-vm", "add", "accept", "proto=tcp", "expire=+3600"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let raw = qvm_firewall(&root, &["--raw", "test-vm", "list"]).stdout;
    assert!(
        raw.ends_with("action=accept proto=tcp expire=1800003600\n"),
        "{raw}"
    );
    let table = qvm_firewall(&root, &["test-vm", "list"]).stdout;
    let last = table.lines().last().expect("row");
    assert_eq!(
        last.split_whitespace().collect::<Vec<_>>(),
        ["2", "accept", "-", "tcp", "-", "-", "-", "+3600s", "-"]
    );
}

#[test]
fn argument_errors_exit_2_and_change_nothing() {
    let (_d, root) = store_with_upstream_rules();
    let before = firewall_xml(&root);
    for (args, msg) in [
        (
            &["test-vm", "add", "accept", "dsthost="][..],
            "qvm-firewall: error: invalid rule description: dsthost=",
        ),
        (
            &["test-vm", "add", "accept", "foo=bar"],
            "qvm-firewall: error: Invalid rule element: foo=bar",
        ),
        (
            &["test-vm", "add", "accept", "comment=a=b"],
            "qvm-firewall: error: invalid rule description: comment=a=b",
        ),
        (
            &["test-vm", "add"],
            "qvm-firewall: error: the following arguments are required: rule",
        ),
        (
            &["test-vm", "add", "--before", "x", "accept"],
            "qvm-firewall: error: argument --before: invalid int value: 'x'",
        ),
        (
            &["nope", "list"],
            "qvm-firewall: error: no such domain: 'nope'",
        ),
        (
            &["../etc", "list"],
            "qvm-firewall: error: no such domain: '../etc'",
        ),
        (
            &[],
            "qvm-firewall: error: the following arguments are required: VMNAME",
        ),
        (
            &["test-vm", "frobnicate"],
            "qvm-firewall: error: argument command: invalid choice: 'frobnicate'",
        ),
        (
            &["test-vm", "list", "--raw"],
            "qvm-firewall: error: unrecognized arguments: --raw",
        ),
    ] {
        let o = qvm_firewall(&root, args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains(msg), "{args:?}: {}", o.stderr);
        assert!(o.stderr.starts_with("usage: qvm-firewall"), "{args:?}");
        assert!(o.stdout.is_empty());
    }
    assert_eq!(firewall_xml(&root), before);
}

#[test]
fn refused_rules_exit_1_and_change_nothing() {
    let (_d, root) = store_with_upstream_rules();
    let before = firewall_xml(&root);
    for (args, msg) in [
        // The client lets 65536 through; dom0 refuses it.
        (
            &["test-vm", "add", "accept", "proto=tcp", "dstports=65536"][..],
            "Error: Ports out of range\n",
        ),
        (
            &["test-vm", "add", "accept", "1.2.3.4/33"],
            "Error: netmask for IPv4 must be <= 32\n",
        ),
        (&["test-vm", "add", "reject"], "Error: reject\n"),
        (
            &["test-vm", "add", "accept", "dstports=80"],
            "Error: dstports valid only for 'tcp' and 'udp' protocols\n",
        ),
        (
            &["test-vm", "add", "accept", "comment=caf\u{e9}"],
            "Error: Rules contains non-ASCII characters\n",
        ),
        (
            &["test-vm", "del", "--rule-no", "5"],
            "Error: no rule number 5 (the qube has 2 rules, numbered from 0)\n",
        ),
        (
            &["test-vm", "del", "accept", "proto=udp"],
            "Error: no such rule: action=accept proto=udp\n",
        ),
    ] {
        let o = qvm_firewall(&root, args);
        assert_eq!((o.code, o.stderr.as_str()), (1, msg), "{args:?}");
    }
    assert_eq!(firewall_xml(&root), before);
}

#[test]
fn unreadable_firewall_xml_is_an_error_not_a_default() {
    let (_d, root) = store_with_upstream_rules();
    fs::write(
        root.join("appvms/test-vm/firewall.xml"),
        "<firewall version=\"9\"/>",
    )
    .expect("write");
    let o = qvm_firewall(&root, &["test-vm", "list"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("Unsupported firewall.xml version: 9"),
        "{}",
        o.stderr
    );
    let o = qvm_firewall(&root, &["test-vm", "add", "accept"]);
    assert_eq!(
        o.code, 1,
        "an edit must not replace rules it could not read"
    );
}

#[test]
fn store_from_environment() {
    let (_d, root) = store_with_upstream_rules();
    let out = Command::new(env!("CARGO_BIN_EXE_qvm-firewall"))
        .args(["--raw", "test-vm", "list"])
        .env("QUBES_FIREWALL_STORE", &root)
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "action=accept dsthost=qubes-os.org\naction=drop proto=icmp\n"
    );
}

#[test]
fn help_explains_the_grammar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = qvm_firewall(dir.path(), &["--help"]);
    assert_eq!(o.code, 0);
    for needle in [
        "<action> [<dsthost> [<proto> [<dstports>|<icmptype>]]]",
        "--store",
        "expire",
    ] {
        assert!(o.stdout.contains(needle), "{needle}");
    }
}
