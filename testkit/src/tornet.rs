//! A private Tor network for tests, made of Debian's `tor` and `tor-gencert`, inside a network
//! namespace the caller created: three directory authorities (which also relay), two middle
//! relays and two exits (tor's `TestingTorNetwork` mode with chutney's fast voting intervals).
//! [`TorNet::start`] puts every relay on the namespace's loopback, each on its own port;
//! [`TorNet::start_on`] gives each relay an address of its own, with Tor's usual ports (ORPort
//! 9001, DirPort 9030), as the lab's world does. Nothing in it reaches beyond the namespace.
//!
//! What a client needs to use it is in [`TorNet::authorities`] and [`TorNet::fallbacks`]. The
//! first consensus takes about 30 s ([`TorNet::wait_consensus`]).

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One relay as a client must know it to use it as a fallback directory cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The RSA identity fingerprint, 40 hex digits.
    pub rsa_identity: String,
    /// The ed25519 identity, base64 without padding.
    pub ed_identity: String,
    pub orport: String,
}

/// A running private network, stopped (every tor killed) when dropped.
#[derive(Debug)]
pub struct TorNet {
    pub dir: PathBuf,
    pub ns: String,
    /// The v3 identities of the directory authorities.
    pub authorities: Vec<String>,
    /// The authorities as fallback caches.
    pub fallbacks: Vec<Fallback>,
    /// The exits' OR ports.
    pub exit_orports: Vec<String>,
    /// Every relay's OR port (`address:port`): all a Tor client ever connects to.
    pub orports: Vec<String>,
    pid_files: Vec<PathBuf>,
    /// Whether dropping it stops the relays ([`TorNet::detach`] clears it).
    owned: bool,
}

/// The relays' nicknames, in the order of [`TorNet::orports`]: authorities, middles, exits.
/// Two exits: a client may pick one as its guard, and a path never uses the same relay twice,
/// so with one exit such a client could build no exit circuit at all.
pub const NICKNAMES: [&str; 7] = ["a1", "a2", "a3", "r1", "r2", "e1", "e2"];

/// Where each relay listens, and the resolver the exits use.
struct Layout {
    /// (address, ORPort, DirPort for the authorities) per relay, in [`NICKNAMES`] order.
    nodes: Vec<(Ipv4Addr, u16, Option<u16>)>,
    resolver: Ipv4Addr,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, prog: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, prog]);
    c
}

fn private_dir(p: &Path) -> Result<(), String> {
    fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", p.display()))
}

impl TorNet {
    /// Whether `tor` and `tor-gencert` are installed.
    pub fn available() -> bool {
        ["tor", "tor-gencert"]
            .iter()
            .all(|p| Command::new(p).arg("--help").output().is_ok())
    }

    /// Whether `test`, which needs root and a private network, can run here; if not, it is
    /// reported as not run ([`crate::not_run`], a failure under CI) and the test should return.
    #[track_caller]
    pub fn can_run(test: &str) -> bool {
        if !crate::require_root(test) {
            return false;
        }
        if !Self::available() {
            crate::not_run(
                test,
                "tor is not installed (scripts/setup-debian.sh installs it)",
            );
            return false;
        }
        true
    }

    /// Builds and starts the network in namespace `ns` (its `lo` must be up), keeping its
    /// files under `dir`: every relay on 127.0.0.1 (ORPorts 5001-5007, the authorities'
    /// DirPorts 7001-7003), the exits resolving names through a DNS server on 127.0.0.1.
    pub fn start(dir: &Path, ns: &str) -> Result<TorNet, String> {
        let lo = Ipv4Addr::LOCALHOST;
        let nodes = (0..7u16)
            .map(|i| (lo, 5001 + i, (i < 3).then_some(7001 + i)))
            .collect();
        Self::start_layout(
            dir,
            ns,
            Layout {
                nodes,
                resolver: lo,
            },
        )
    }

    /// As [`TorNet::start`], but relay `i` (in [`NICKNAMES`] order) listens on `first + i`
    /// (ORPort 9001; the authorities' DirPort 9030), addresses the namespace must already
    /// hold, and the exits resolve names through the DNS server at `resolver`.
    pub fn start_on(
        dir: &Path,
        ns: &str,
        first: Ipv4Addr,
        resolver: Ipv4Addr,
    ) -> Result<TorNet, String> {
        let nodes = Self::addresses(first)
            .into_iter()
            .enumerate()
            .map(|(i, a)| (a, 9001, (i < 3).then_some(9030)))
            .collect();
        Self::start_layout(dir, ns, Layout { nodes, resolver })
    }

    /// The `network` value of a service's `tor:` section (runtime `config_file`) that selects
    /// this network: its authorities, and the authorities as fallback caches, in YAML's flow
    /// style.
    pub fn network_yaml(&self) -> String {
        let auths: Vec<String> = self
            .authorities
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        let fbs: Vec<String> = self
            .fallbacks
            .iter()
            .map(|f| {
                format!(
                    "{{rsa_identity: \"{}\", ed_identity: \"{}\", orport: \"{}\"}}",
                    f.rsa_identity, f.ed_identity, f.orport
                )
            })
            .collect();
        format!(
            "{{authorities: [{}], fallbacks: [{}]}}",
            auths.join(", "),
            fbs.join(", ")
        )
    }

    /// The addresses [`TorNet::start_on`] gives the relays.
    pub fn addresses(first: Ipv4Addr) -> Vec<Ipv4Addr> {
        (0..NICKNAMES.len() as u32)
            .map(|i| Ipv4Addr::from(u32::from(first) + i))
            .collect()
    }

    /// Leaves the relays running when this value is dropped (they are daemons; whoever owns
    /// the namespace stops them), and returns the files of pids of the relays.
    pub fn detach(mut self) -> Vec<PathBuf> {
        self.owned = false;
        std::mem::take(&mut self.pid_files)
    }

    fn start_layout(dir: &Path, ns: &str, layout: Layout) -> Result<TorNet, String> {
        let nodes: Vec<(&str, Ipv4Addr, u16, Option<u16>)> = NICKNAMES
            .iter()
            .zip(&layout.nodes)
            .map(|(n, (a, o, d))| (*n, *a, *o, *d))
            .collect();
        let mut net = TorNet {
            dir: dir.to_path_buf(),
            ns: ns.to_string(),
            authorities: Vec::new(),
            fallbacks: Vec::new(),
            exit_orports: nodes
                .iter()
                .filter(|(n, ..)| n.starts_with('e'))
                .map(|(_, a, p, _)| format!("{a}:{p}"))
                .collect(),
            orports: nodes
                .iter()
                .map(|(_, a, p, _)| format!("{a}:{p}"))
                .collect(),
            pid_files: Vec::new(),
            owned: true,
        };
        let resolv = dir.join("resolv.conf");
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        fs::write(&resolv, format!("nameserver {}\n", layout.resolver))
            .map_err(|e| e.to_string())?;
        let mut dirauths = String::new();
        // Keys and identities first: every torrc names every authority.
        for &(nick, addr, orport, dirport) in &nodes {
            let d = dir.join(nick);
            private_dir(&d.join("keys"))?;
            if let Some(dp) = dirport {
                let mut c = in_ns(ns, "tor-gencert");
                c.args(["--create-identity-key", "-m", "12", "-a"])
                    .arg(format!("{addr}:{dp}"))
                    .arg("-i")
                    .arg(d.join("keys/authority_identity_key"))
                    .arg("-s")
                    .arg(d.join("keys/authority_signing_key"))
                    .arg("-c")
                    .arg(d.join("keys/authority_certificate"))
                    .arg("--passphrase-fd")
                    .arg("0")
                    .stdin(std::process::Stdio::null());
                run(&mut c)?;
            }
            let mut c = in_ns(ns, "tor");
            c.args([
                "--ignore-missing-torrc",
                "-f",
                "/dev/null",
                "--DataDirectory",
            ])
            .arg(&d)
            .args([
                "--ORPort",
                "1",
                "--Address",
                &addr.to_string(),
                "--list-fingerprint",
            ]);
            run(&mut c)?;
            let rsa = read_second_word(&d.join("fingerprint"))?;
            let ed = read_second_word(&d.join("fingerprint-ed25519"))?;
            if let Some(dp) = dirport {
                let cert = fs::read_to_string(d.join("keys/authority_certificate"))
                    .map_err(|e| e.to_string())?;
                let v3 = cert
                    .lines()
                    .find_map(|l| l.strip_prefix("fingerprint "))
                    .ok_or("no fingerprint in an authority certificate")?
                    .trim()
                    .to_string();
                let _ = writeln!(
                    dirauths,
                    "DirAuthority {nick} orport={orport} no-v2 v3ident={v3} {addr}:{dp} {rsa}"
                );
                net.authorities.push(v3);
                net.fallbacks.push(Fallback {
                    rsa_identity: rsa,
                    ed_identity: ed,
                    orport: format!("{addr}:{orport}"),
                });
            }
        }
        fs::write(dir.join("dirauths.conf"), &dirauths).map_err(|e| e.to_string())?;
        for &(nick, addr, orport, dirport) in &nodes {
            let d = dir.join(nick);
            let pid = d.join("tor.pid");
            let mut rc = format!(
                "TestingTorNetwork 1\nDataDirectory {d}\nNickname {nick}\nAddress {addr}\n\
                 ContactInfo test@example.invalid\nRunAsDaemon 1\nPidFile {pid}\nSandbox 0\n\
                 Log notice file {d}/notice.log\nSafeLogging 0\n\
                 PathsNeededToBuildCircuits 0.67\nTestingDirAuthVoteExit *\n\
                 TestingDirAuthVoteHSDir *\nTestingDirAuthVoteGuard *\n\
                 TestingMinExitFlagThreshold 0\nV3AuthNIntervalsValid 2\nAssumeReachable 1\n\
                 ServerDNSDetectHijacking 0\nServerDNSTestAddresses\n\
                 ServerDNSResolvConfFile {resolv}\nServerDNSAllowBrokenConfig 1\n\
                 SocksPort 0\nORPort {addr}:{orport}\nOutboundBindAddress {addr}\n\
                 %include {dirauths}\n",
                d = d.display(),
                pid = pid.display(),
                resolv = resolv.display(),
                dirauths = dir.join("dirauths.conf").display(),
            );
            match (dirport, nick) {
                (Some(dp), _) => rc.push_str(&format!(
                    "DirPort {addr}:{dp}\nAuthoritativeDirectory 1\nV3AuthoritativeDirectory 1\n\
                     TestingV3AuthInitialVotingInterval 20\nTestingV3AuthInitialVoteDelay 4\n\
                     TestingV3AuthInitialDistDelay 4\nV3AuthVotingInterval 20\n\
                     V3AuthVoteDelay 4\nV3AuthDistDelay 4\nExitPolicy reject *:*\n"
                )),
                (None, "e1" | "e2") => rc.push_str(
                    "ExitRelay 1\nExitPolicyRejectPrivate 0\nExitPolicy accept 127.0.0.0/8:*\n\
                     ExitPolicy accept 198.18.0.0/15:*\n\
                     ExitPolicy accept *:80,accept *:443,accept *:8000-8099\n\
                     ExitPolicy reject *:*\n",
                ),
                _ => rc.push_str("ExitRelay 0\nExitPolicy reject *:*\n"),
            }
            let torrc = d.join("torrc");
            fs::write(&torrc, rc).map_err(|e| e.to_string())?;
            let mut c = in_ns(ns, "tor");
            c.arg("-f").arg(&torrc);
            run(&mut c)?;
            net.pid_files.push(pid);
        }
        Ok(net)
    }

    /// Waits until the first authority's consensus lists every relay of the network (a first
    /// consensus may list only some: relays join as the authorities learn of them) and every
    /// relay has bootstrapped from it, which is when a client can use the exits (about 30-60 s
    /// after start). An exit that has no consensus yet answers a client's BEGIN with an END,
    /// which arti reports as a protocol error.
    pub fn wait_consensus(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if self.relays_in_consensus() >= NICKNAMES.len()
                && self.relays_bootstrapped() >= NICKNAMES.len()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = fs::read_to_string(self.dir.join("a1/notice.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(format!(
                    "no consensus within {} s; a1's log ends:\n{}",
                    within.as_secs(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl TorNet {
    /// How many relays the first authority's latest consensus lists (0 before the first).
    pub fn relays_in_consensus(&self) -> usize {
        let a1 = self.dir.join("a1");
        ["cached-microdesc-consensus", "cached-consensus"]
            .iter()
            .filter_map(|f| fs::read_to_string(a1.join(f)).ok())
            .map(|c| c.lines().filter(|l| l.starts_with("r ")).count())
            .max()
            .unwrap_or(0)
    }

    /// How many relays say in their log that they have bootstrapped (`Bootstrapped 100%`):
    /// they hold a consensus and have built circuits.
    pub fn relays_bootstrapped(&self) -> usize {
        NICKNAMES
            .iter()
            .filter(|n| {
                fs::read_to_string(self.dir.join(n).join("notice.log"))
                    .is_ok_and(|l| l.contains("Bootstrapped 100%"))
            })
            .count()
    }
}

fn read_second_word(p: &Path) -> Result<String, String> {
    let t = fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    t.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("{}: no identity in {t:?}", p.display()))
}

impl Drop for TorNet {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        for p in &self.pid_files {
            if let Some(pid) = fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}
