//! Generates the pcap corpus in tests/pcap/ from the scenarios in tests/corpus/scenarios.rs.
//!
//! ```text
//! cargo run -p sys-firewall --example gen_corpus -- [--bless] [SCENARIO...]
//! ```
//!
//! First builds every selected scenario and checks it: its expect.txt must state a positive
//! fact, and every fact must hold on the replay of the files it would write. If anything fails
//! it prints each problem (scenario, fact, expected and seen), writes nothing for any scenario
//! and exits 1. Otherwise it writes each scenario's config.yaml, in.pcapng and expect.txt, and
//! with `--bless` out.pcapng (only files whose bytes change). `--show` writes nothing and lists
//! the stored in.pcapng and out.pcapng frame by frame. SCENARIO selects scenarios by name or a
//! prefix of it (`07`, `07-ndp`); none means all.

#[path = "../tests/corpus/mod.rs"]
mod corpus;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut bless = false;
    let mut show = false;
    let mut wanted = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--bless" => bless = true,
            "--show" => show = true,
            "-h" | "--help" => {
                println!(
                    "usage: gen_corpus [--bless | --show] [SCENARIO...]\n\n\
                     Checks every selected scenario's facts on a replay, then writes\n\
                     tests/pcap/<scenario>/{{config.yaml,in.pcapng,expect.txt}};\n\
                     --bless also writes out.pcapng. If any fact fails, nothing is written.\n\
                     --show lists the stored captures instead of writing anything.\n\
                     SCENARIO: a scenario name or a prefix of it (e.g. 07)."
                );
                return ExitCode::SUCCESS;
            }
            s if s.starts_with('-') => {
                eprintln!("gen_corpus: unknown option {s} (try --help)");
                return ExitCode::FAILURE;
            }
            s => wanted.push(s.to_string()),
        }
    }
    let all = corpus::scenarios::all();
    let selected: Vec<_> = all
        .iter()
        .filter(|s| wanted.is_empty() || wanted.iter().any(|w| s.name.starts_with(w.as_str())))
        .collect();
    if selected.is_empty() {
        eprintln!("gen_corpus: no scenario matches {}", wanted.join(" "));
        return ExitCode::FAILURE;
    }
    if show {
        for sc in &selected {
            let dir = corpus::corpus_dir().join(sc.name);
            println!("== {}", sc.name);
            for file in ["in.pcapng", "out.pcapng"] {
                println!("-- {file}");
                match std::fs::read(dir.join(file))
                    .map_err(|e| e.to_string())
                    .and_then(|b| corpus::list_capture(&b))
                {
                    Ok(lines) => {
                        for (i, (_, l)) in lines.iter().enumerate() {
                            println!("{i:3} {l}");
                        }
                    }
                    Err(e) => println!("   ({e})"),
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    let selected: Vec<corpus::Scenario> = selected.into_iter().copied().collect();
    let result = corpus::generate(&selected, &corpus::corpus_dir(), bless);
    if let Ok(dir) = std::fs::read_dir(corpus::corpus_dir()) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if e.path().is_dir() && !all.iter().any(|s| s.name == name) {
                eprintln!("warning: tests/pcap/{name} is not a scenario any more; remove it");
            }
        }
    }
    match result {
        Ok(written) => {
            for w in &written {
                println!("wrote {w}");
            }
            println!(
                "{} scenario(s) verified, {} file(s) written{}",
                selected.len(),
                written.len(),
                if bless {
                    ""
                } else {
                    " (inputs only; --bless writes out.pcapng)"
                }
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in &problems {
                eprintln!("REFUSED {}", p.replace('\n', "\n  "));
            }
            let failing = selected
                .iter()
                .filter(|s| {
                    problems
                        .iter()
                        .any(|p| p.starts_with(&format!("{}:", s.name)))
                })
                .count();
            eprintln!(
                "gen_corpus: {} problem(s) in {failing} of {} scenario(s): nothing written",
                problems.len(),
                selected.len()
            );
            ExitCode::FAILURE
        }
    }
}
