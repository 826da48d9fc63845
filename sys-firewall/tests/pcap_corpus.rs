//! The pcap corpus (tests/pcap/ at the top of the workspace): every scenario replays to exactly
//! its stored output, its expectations hold and include a positive fact, and its stored inputs
//! are what the generator builds; the generator refuses to write a scenario whose facts fail.
//!
//! Regenerate with `cargo run -p sys-firewall --example gen_corpus -- --bless`; see
//! tests/pcap/README.md.

mod corpus;

use std::path::PathBuf;

use corpus::{corpus_dir, expect, packets, scenarios, Cfg, Scenario, Script, R};

/// The issue asks for at least this many scenarios.
const MIN_SCENARIOS: usize = 40;

fn scenario_dirs() -> Vec<PathBuf> {
    let dir = corpus_dir();
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

fn name_of(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

#[test]
fn the_corpus_is_the_scenario_table() {
    let dirs: Vec<String> = scenario_dirs().iter().map(|p| name_of(p)).collect();
    let table: Vec<&str> = scenarios::all().iter().map(|s| s.name).collect();
    assert!(
        dirs.len() >= MIN_SCENARIOS,
        "only {} scenarios in {} (want at least {MIN_SCENARIOS})",
        dirs.len(),
        corpus_dir().display()
    );
    let missing: Vec<&&str> = table
        .iter()
        .filter(|n| !dirs.iter().any(|d| d == *n))
        .collect();
    let extra: Vec<&String> = dirs
        .iter()
        .filter(|d| !table.contains(&d.as_str()))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "scenario folders and tests/corpus/scenarios.rs disagree: not generated {missing:?}, \
         not in the table {extra:?} (run the generator, remove stale folders)"
    );
    let mut sorted = table.clone();
    sorted.sort();
    assert_eq!(sorted, table, "keep scenarios.rs in folder order");
}

#[test]
fn every_scenario_replays_to_its_expected_output() {
    let mut failures = Vec::new();
    let dirs = scenario_dirs();
    for dir in &dirs {
        let name = name_of(dir);
        let out = match corpus::replay_dir(dir) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{name}: replay failed: {e}"));
                continue;
            }
        };
        match std::fs::read(dir.join("out.pcapng")) {
            Err(_) => failures.push(format!(
                "{name}: out.pcapng is missing: bless it with \
                 `cargo run -p sys-firewall --example gen_corpus -- --bless {name}`"
            )),
            Ok(stored) if stored != out.pcapng => failures.push(format!(
                "{name}: the output differs from out.pcapng (- stored, + produced):\n{}",
                corpus::diff_captures(&stored, &out.pcapng)
            )),
            Ok(_) => {}
        }
        let expect_txt = std::fs::read_to_string(dir.join("expect.txt")).unwrap_or_default();
        let fails = corpus::check_expectations(&expect_txt, &out);
        if !fails.is_empty() {
            let listing = corpus::list_capture(&out.pcapng)
                .map(|l| {
                    l.iter()
                        .enumerate()
                        .map(|(i, (_, line))| format!("    {i:3} {line}\n"))
                        .collect::<String>()
                })
                .unwrap_or_default();
            failures.push(format!(
                "{name}: expectations failed:\n  {}\n  produced:\n{listing}  {}",
                fails.join("\n  "),
                corpus::summary(&out).replace('\n', "\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_scenario_pins_a_positive_fact() {
    let mut failures = Vec::new();
    for dir in scenario_dirs() {
        let text = std::fs::read_to_string(dir.join("expect.txt")).unwrap_or_default();
        let r = expect::parse(&text).and_then(|e| expect::require_positive(&e));
        if let Err(m) = r {
            failures.push(format!("{}: {m}", name_of(&dir)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// Scenarios for the generator's own tests: one whose facts hold, one with a false fact, one
// with only negative facts. A client ARPs for its gateway (Qubes answers with the Xen netback
// MAC fe:ff:ff:ff:ff:ff).

fn gateway_arp(s: &mut Script) -> R {
    s.about("A client ARPs for its gateway");
    s.config(Cfg::new().client(&scenarios::C3))?;
    s.send(
        "vif3.0",
        packets::arp_request(scenarios::C3.mac, scenarios::C3.ip, corpus::FW_IP),
    )
}

fn true_facts(s: &mut Script) -> R {
    gateway_arp(s)?;
    s.expect("frame 0 on vif3.0: arp-reply sha fe:ff:ff:ff:ff:ff spa 10.137.0.6");
    Ok(())
}

fn a_false_fact(s: &mut Script) -> R {
    gateway_arp(s)?;
    s.expect("no ip frames on eth0");
    s.expect("frame 0 on vif3.0: arp-reply sha 00:16:3e:5e:6c:00 spa 10.137.0.6");
    Ok(())
}

fn only_negative_facts(s: &mut Script) -> R {
    gateway_arp(s)?;
    s.expect("no ip frames on eth0");
    s.expect("no ip frames on vif3.0");
    Ok(())
}

fn files_under(dir: &std::path::Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(files_under(&p));
        } else {
            let bytes = std::fs::read(&p).expect("read");
            v.push((p, bytes));
        }
    }
    v.sort();
    v
}

#[test]
fn the_generator_refuses_to_bless_a_false_fact() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let good = Scenario {
        name: "01-good",
        build: true_facts,
    };
    let bad = Scenario {
        name: "02-false-fact",
        build: a_false_fact,
    };
    let problems =
        corpus::generate(&[good, bad], tmp.path(), true).expect_err("a false fact is refused");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let p = &problems[0];
    for want in [
        "02-false-fact",
        "frame 0 on vif3.0: arp-reply sha 00:16:3e:5e:6c:00 spa 10.137.0.6",
        "expected sha 00:16:3e:5e:6c:00",
        "seen sha fe:ff:ff:ff:ff:ff",
    ] {
        assert!(p.contains(want), "{want:?} not in {p}");
    }
    assert!(
        files_under(tmp.path()).is_empty(),
        "nothing may be written, not even for the good scenario: {:?}",
        files_under(tmp.path())
    );

    // Only negative facts: refused too, and the stored files stay as they were.
    let written = corpus::generate(&[good], tmp.path(), true).expect("good scenario");
    let before = files_under(tmp.path());
    let names: Vec<String> = before.iter().map(|(p, _)| name_of(p)).collect();
    assert_eq!(
        names,
        ["config.yaml", "expect.txt", "in.pcapng", "out.pcapng"],
        "{written:?}"
    );
    let neg = Scenario {
        name: "01-good",
        build: only_negative_facts,
    };
    let problems = corpus::generate(&[neg], tmp.path(), true).expect_err("no positive fact");
    assert!(
        problems.len() == 1 && problems[0].contains("01-good: no positive fact"),
        "{problems:#?}"
    );
    assert_eq!(files_under(tmp.path()), before, "nothing may be rewritten");
}

#[test]
fn positive_facts_are_frames_with_fields_or_drop_counters() {
    let positive = |line: &str| {
        let e = expect::parse(&format!("# x\n{line}\n")).expect(line);
        expect::is_positive(&e.facts[0].fact)
    };
    for yes in [
        "frame 0 on vif3.0: arp-reply spa 10.137.0.6",
        "ip frame 1 on eth0: ipv4 sport $p",
        "counter spoofed on vif3.0 = 2",
        "counter no-flow on eth0 >= 1",
    ] {
        assert!(positive(yes), "{yes}");
    }
    for no in [
        "no frames on vif3.0",
        "ip frames on eth0 = 1",
        "frame 0 on vif3.0: arp-reply",
        "counter spoofed on vif3.0 = 0",
        "counter spoofed on vif3.0 <= 2",
        "counter no-flow on eth0 >= 0",
        "counter accepted on vif3.0 = 1",
        "event client-blocked on vif3.0 >= 1",
        "resolve web.example >= 1",
    ] {
        assert!(!positive(no), "{no}");
    }
}

#[test]
fn stored_inputs_are_what_the_generator_builds() {
    let mut failures = Vec::new();
    for sc in scenarios::all() {
        let built = match corpus::build(&sc) {
            Ok(b) => b,
            Err(e) => {
                failures.push(format!("{}: the generator fails: {e}", sc.name));
                continue;
            }
        };
        let dir = corpus_dir().join(sc.name);
        for (file, bytes) in [
            ("config.yaml", built.config_yaml.as_bytes()),
            ("in.pcapng", built.in_pcapng.as_slice()),
            ("expect.txt", built.expect_txt.as_bytes()),
        ] {
            let stored = std::fs::read(dir.join(file)).unwrap_or_default();
            if stored != bytes {
                let detail = if file == "in.pcapng" {
                    format!("\n{}", corpus::diff_captures(&stored, bytes))
                } else {
                    String::new()
                };
                failures.push(format!(
                    "{}: {file} is not what the generator builds (regenerate with \
                     `cargo run -p sys-firewall --example gen_corpus -- --bless {}`){detail}",
                    sc.name, sc.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_command_line_replays_like_the_library() {
    let dir = corpus_dir().join("29-nat-tcp-handshake-and-data");
    let tmp = tempfile::tempdir().expect("temp dir");
    let out_path = tmp.path().join("out.pcapng");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sys-firewall"))
        .arg("replay")
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .arg("--in")
        .arg(dir.join("in.pcapng"))
        .arg("--out")
        .arg(&out_path)
        .status()
        .expect("run sys-firewall");
    assert!(status.success());
    let lib = corpus::replay_dir(&dir).expect("replay");
    assert_eq!(std::fs::read(&out_path).expect("output"), lib.pcapng);

    // Another seed, other NAT ports where the seed decides them: two clients from the same
    // port to the same server, the second of which cannot keep its port.
    let dir = corpus_dir().join("08-two-clients-nat-apart");
    let lib = corpus::replay_dir(&dir).expect("replay");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sys-firewall"))
        .args(["replay", "--seed", "12345", "--config"])
        .arg(dir.join("config.yaml"))
        .arg("--in")
        .arg(dir.join("in.pcapng"))
        .arg("--out")
        .arg(&out_path)
        .status()
        .expect("run sys-firewall");
    assert!(status.success());
    assert_ne!(std::fs::read(&out_path).expect("output"), lib.pcapng);

    // Errors name the file and exit 1.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "qubesdb: {}\nbogus: 1\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sys-firewall"))
        .arg("replay")
        .arg("--config")
        .arg(&bad)
        .arg("--in")
        .arg(dir.join("in.pcapng"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .expect("run sys-firewall");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml") && err.contains("bogus"), "{err}");
}

#[test]
fn the_expectations_language_parses_and_matches() {
    let text = "# about\n\
                ip frames on eth0 >= 1\n\
                no frames on vif3.0\n\
                tcp frame 0 on eth0: ipv4 src 10.137.0.6 sport $p flags AS\n\
                counter spoofed on vif3.0 = 0\n\
                event flows-cut on vif3.0 = 0\n\
                resolve web.example <= 3\n\
                distinct $p $q\n";
    let e = expect::parse(text).expect("parses");
    assert_eq!(e.about, "about");
    assert_eq!(e.facts.len(), 7);
    let preds =
        expect::parse_preds("tcp flags AS dmac FE:FF:FF:FF:FF:FF src 10.0.0.1").expect("preds");
    assert!(preds.contains(&expect::Pred::Field("flags".into(), "SA".into())));
    assert!(preds.contains(&expect::Pred::Field(
        "dmac".into(),
        "fe:ff:ff:ff:ff:ff".into()
    )));
    for bad in [
        "frames on eth0 == 1",
        "bogus frames on eth0 = 1",
        "frame 0 on eth0 ip",
        "frame x on eth0: ip",
        "frame 0 on eth0: colour red",
        "frame 0 on eth0: src 10.0.0",
        "counter nonsense on eth0 = 1",
        "distinct $a",
        "hello",
    ] {
        let e = expect::parse(&format!("# x\n{bad}\n")).expect_err(bad);
        assert!(e.contains("line 2"), "{bad}: {e}");
    }
    assert!(
        expect::parse("frames on eth0 = 1\n").is_err(),
        "needs a description"
    );

    let frame = corpus::packets::tcp(
        corpus::packets::from_netvm(),
        "10.137.0.6:1234",
        "198.18.0.10:80",
    )
    .flags("SA")
    .frame();
    let d = corpus::frame::decode(&frame);
    assert!(d.problems.is_empty(), "{}", d.describe());
    let mut vars = Default::default();
    let ok = expect::parse_preds("ipv4 tcp sport $p dport 80 flags SA ttl 64").expect("preds");
    expect::match_preds(&d, &ok, &mut vars).expect("matches");
    assert_eq!(vars.get("p").map(String::as_str), Some("1234"));
    let again = expect::parse_preds("sport $p").expect("preds");
    expect::match_preds(&d, &again, &mut vars).expect("same value");
    let other = expect::parse_preds("dport $p").expect("preds");
    assert!(expect::match_preds(&d, &other, &mut vars).is_err());
    let wrong = expect::parse_preds("udp").expect("preds");
    assert!(expect::match_preds(&d, &wrong, &mut vars).is_err());
    let mut broken = frame.clone();
    broken[24] ^= 1;
    assert!(!corpus::frame::decode(&broken).problems.is_empty());
}
