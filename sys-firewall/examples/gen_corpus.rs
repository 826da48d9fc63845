//! Generates the pcap corpus in tests/pcap/ from the scenarios in tests/corpus/scenarios.rs.
//!
//! ```text
//! cargo run -p sys-firewall --example gen_corpus -- [--bless] [SCENARIO...]
//! ```
//!
//! Writes each scenario's config.yaml, in.pcapng and expect.txt (only files whose bytes change).
//! With `--bless` it also replays the written files and writes out.pcapng, then checks
//! expect.txt against it. `--show` writes nothing and lists the stored in.pcapng and
//! out.pcapng frame by frame. SCENARIO selects scenarios by name or a prefix of it (`07`,
//! `07-ndp`); none means all.

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
                     Writes tests/pcap/<scenario>/{{config.yaml,in.pcapng,expect.txt}};\n\
                     --bless also writes out.pcapng from a replay and checks expect.txt;\n\
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
    let mut failed = 0;
    for sc in &selected {
        let built = match corpus::build(sc) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("FAILED {}\n  {}", sc.name, e.replace('\n', "\n  "));
                failed += 1;
                continue;
            }
        };
        match corpus::write(&built, bless) {
            Ok(r) => {
                for w in &r.written {
                    println!("wrote {w}");
                }
                if !r.failures.is_empty() {
                    failed += 1;
                    eprintln!("EXPECTATIONS FAILED {}", sc.name);
                    for f in &r.failures {
                        eprintln!("  {f}");
                    }
                }
            }
            Err(e) => {
                eprintln!("FAILED {}\n  {}", sc.name, e.replace('\n', "\n  "));
                failed += 1;
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(corpus::corpus_dir()) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if e.path().is_dir() && !all.iter().any(|s| s.name == name) {
                eprintln!("warning: tests/pcap/{name} is not a scenario any more; remove it");
            }
        }
    }
    println!(
        "{} scenario(s), {} failed{}",
        selected.len(),
        failed,
        if bless {
            ""
        } else {
            " (inputs only; --bless writes out.pcapng)"
        }
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
