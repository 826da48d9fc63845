//! Compiled classifier vs the first-match walk on seeded, realistic rule sets.
//!
//! `cargo bench -p qubes-rules --bench classifier`. Prints one table (median of several rounds)
//! and the ratio of the compiled lookup cost at 10,000 rules to that at 10 rules.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use qubes_rules::classifier::{
    Classifier, LinearScan, Packet, PacketProto, UnresolvedPolicy, Verdict,
};
use qubes_rules::{Action, DstPorts, MatchDst, MatchRule, Proto};

const SIZES: [usize; 3] = [10, 1_000, 10_000];
const PACKETS: usize = 4096;
/// Timed rounds of the compiled lookups (all sizes per round) and of the linear walk.
const ROUNDS: usize = 15;
const LINEAR_ROUNDS: usize = 5;
/// Each timed round runs at least this long.
const ROUND_TIME: Duration = Duration::from_millis(10);
const COMMON_PORTS: [u16; 12] = [22, 25, 53, 80, 110, 143, 443, 993, 995, 3306, 5432, 8080];

/// xorshift64*: enough randomness for test data, and the same data on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct RuleSet {
    rules: Vec<MatchRule>,
    hosts: HashMap<String, Vec<IpAddr>>,
    dns: Vec<IpAddr>,
}

fn base_rule(action: Action) -> MatchRule {
    MatchRule {
        action,
        proto: None,
        dst: None,
        dstports: None,
        dns: false,
        icmptype: None,
    }
}

/// Two IPv6 /32s that the v6 rules live in, as upstream users' rules tend to cluster.
const V6_NETS: [u128; 2] = [
    0x2001_0db8_0000_0000_0000_0000_0000_0000,
    0x2a00_1450_0000_0000_0000_0000_0000_0000,
];

fn v6_in_nets(rng: &mut Rng) -> u128 {
    let low = (u128::from(rng.next()) << 64 | u128::from(rng.next())) >> 32;
    rng.pick(&V6_NETS) | low
}

fn ports(rng: &mut Rng) -> DstPorts {
    match rng.below(10) {
        0..=4 => {
            let p = rng.pick(&COMMON_PORTS);
            DstPorts { lo: p, hi: p }
        }
        5..=7 => {
            let p = 1 + rng.below(65_000) as u16;
            DstPorts { lo: p, hi: p }
        }
        _ => {
            let lo = 1 + rng.below(60_000) as u16;
            DstPorts {
                lo,
                hi: lo + rng.below(2_000) as u16,
            }
        }
    }
}

fn proto(rng: &mut Rng) -> Option<Proto> {
    match rng.below(100) {
        0..=34 => Some(Proto::Tcp),
        35..=59 => Some(Proto::Udp),
        60..=69 => Some(Proto::Icmp),
        _ => None,
    }
}

/// A rule list of `n` rules: the usual mix, a DNS rule near the top, a drop policy at the end.
fn rule_set(n: usize, seed: u64) -> RuleSet {
    let mut rng = Rng(seed);
    let dns: Vec<IpAddr> = ["10.139.1.1", "10.139.1.2", "fd09:24ef:4179::a8b:1"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let mut rules = Vec::with_capacity(n);
    let mut hosts = HashMap::new();
    for i in 0..n.saturating_sub(1) {
        let action = if rng.chance(60) {
            Action::Accept
        } else {
            Action::Drop
        };
        let mut r = base_rule(action);
        if i == 1 {
            r.action = Action::Accept;
            r.dns = true;
            rules.push(r);
            continue;
        }
        match rng.below(100) {
            // dst4 prefixes, mostly narrow.
            0..=39 => {
                let len = rng.pick(&[8u8, 12, 16, 20, 24, 24, 28, 32, 32, 32, 32]);
                r.dst = Some(MatchDst::V4(Ipv4Addr::from(rng.next() as u32), len));
                r.proto = proto(&mut rng);
                match r.proto {
                    Some(Proto::Tcp | Proto::Udp) if rng.chance(70) => {
                        r.dstports = Some(ports(&mut rng))
                    }
                    Some(Proto::Icmp) if rng.chance(50) => {
                        r.icmptype = Some(rng.pick(&[0u8, 3, 8, 11]))
                    }
                    None if rng.chance(30) => r.dstports = Some(ports(&mut rng)),
                    _ => {}
                }
            }
            // dst6 prefixes.
            40..=49 => {
                let len = rng.pick(&[48u8, 56, 64, 64, 96, 128, 128]);
                r.dst = Some(MatchDst::V6(Ipv6Addr::from(v6_in_nets(&mut rng)), len));
                r.proto = proto(&mut rng);
                if matches!(r.proto, Some(Proto::Tcp | Proto::Udp)) && rng.chance(60) {
                    r.dstports = Some(ports(&mut rng));
                }
            }
            // dsthost with 1-3 addresses.
            50..=64 => {
                let name = format!("host{i}.example");
                let count = 1 + rng.below(3);
                let addrs = (0..count)
                    .map(|_| {
                        if rng.chance(80) {
                            IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
                        } else {
                            IpAddr::V6(Ipv6Addr::from(v6_in_nets(&mut rng)))
                        }
                    })
                    .collect();
                hosts.insert(name.clone(), addrs);
                r.dst = Some(MatchDst::Host(name));
                r.proto = proto(&mut rng).filter(|p| *p != Proto::Icmp);
                if r.proto.is_some() && rng.chance(60) {
                    r.dstports = Some(ports(&mut rng));
                }
            }
            // Address-less port rules.
            65..=79 => {
                r.proto = Some(if rng.chance(60) {
                    Proto::Tcp
                } else {
                    Proto::Udp
                });
                r.dstports = Some(ports(&mut rng));
            }
            // ICMP types, sometimes to a network.
            80..=84 => {
                r.proto = Some(Proto::Icmp);
                r.icmptype = Some(rng.below(20) as u8);
                if rng.chance(50) {
                    r.dst = Some(MatchDst::V4(Ipv4Addr::from(rng.next() as u32), 24));
                }
            }
            // Single hosts, any protocol.
            _ => r.dst = Some(MatchDst::V4(Ipv4Addr::from(rng.next() as u32), 32)),
        }
        rules.push(r);
    }
    rules.push(base_rule(Action::Drop));
    RuleSet { rules, hosts, dns }
}

/// Half the packets aimed at a rule's addresses and ports, half random.
fn packets(set: &RuleSet, seed: u64) -> Vec<Packet> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(PACKETS);
    while out.len() < PACKETS {
        let random_proto = |rng: &mut Rng| match rng.below(100) {
            0..=49 => PacketProto::Tcp,
            50..=79 => PacketProto::Udp,
            80..=94 => PacketProto::Icmp,
            _ => PacketProto::Other(47),
        };
        if out.len() & 1 == 0 {
            let r = &set.rules[rng.below(set.rules.len() as u64) as usize];
            let dst = match &r.dst {
                Some(MatchDst::V4(a, l)) => {
                    let mask = (1u64 << (32 - u32::from(*l))) - 1;
                    IpAddr::V4(Ipv4Addr::from(
                        u32::from(*a) & !(mask as u32) | (rng.next() & mask) as u32,
                    ))
                }
                Some(MatchDst::V6(a, l)) => {
                    let mask = 1u128
                        .checked_shl(128 - u32::from(*l))
                        .map_or(u128::MAX, |m| m - 1);
                    let low = u128::from(rng.next()) << 64 | u128::from(rng.next());
                    IpAddr::V6(Ipv6Addr::from(u128::from(*a) & !mask | low & mask))
                }
                Some(MatchDst::Host(n)) => rng.pick(&set.hosts[n]),
                None if r.dns => rng.pick(&set.dns),
                None => IpAddr::V4(Ipv4Addr::from(rng.next() as u32)),
            };
            let port = match (r.dstports, r.icmptype) {
                _ if r.dns => 53,
                (Some(p), _) => match rng.below(4) {
                    0 => p.lo,
                    1 => p.hi,
                    2 => p.lo.wrapping_sub(1),
                    _ => p.lo + (rng.below(u64::from(p.hi - p.lo) + 1) as u16),
                },
                (None, Some(t)) => u16::from(t),
                (None, None) => rng.pick(&COMMON_PORTS),
            };
            let proto = match r.proto {
                Some(Proto::Tcp) => PacketProto::Tcp,
                Some(Proto::Udp) => PacketProto::Udp,
                Some(Proto::Icmp) => PacketProto::Icmp,
                None => random_proto(&mut rng),
            };
            out.push(Packet { proto, dst, port });
        } else {
            let dst = if rng.chance(85) {
                IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(v6_in_nets(&mut rng)))
            };
            let proto = random_proto(&mut rng);
            let port = if proto == PacketProto::Icmp {
                rng.below(20) as u16
            } else if rng.chance(50) {
                rng.pick(&COMMON_PORTS)
            } else {
                rng.next() as u16
            };
            out.push(Packet { proto, dst, port });
        }
    }
    out
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A timer for one batch of lookups: a round runs enough passes over the batch to fill
/// `ROUND_TIME` and yields nanoseconds per lookup.
struct Timer<'a, F> {
    packets: &'a [Packet],
    lookup: F,
    reps: usize,
}

impl<'a, F: Fn(Packet) -> Verdict> Timer<'a, F> {
    fn new(packets: &'a [Packet], lookup: F) -> Self {
        let mut t = Timer {
            packets,
            lookup,
            reps: 1,
        };
        // Warm up, then find how many passes fill a round.
        t.pass_time();
        let once = t.pass_time().max(Duration::from_nanos(1));
        t.reps = (ROUND_TIME.as_nanos() / once.as_nanos()).max(1) as usize;
        t
    }

    fn pass_time(&self) -> Duration {
        let start = Instant::now();
        let mut acc = 0usize;
        for &p in self.packets {
            let v = (self.lookup)(black_box(p));
            acc = acc.wrapping_add(v.rule.unwrap_or(usize::MAX));
        }
        black_box(acc);
        start.elapsed()
    }

    /// One untimed pass first: the other sizes ran in between and evicted this one's tables,
    /// and the steady state is what is measured.
    fn round(&self) -> f64 {
        self.pass_time();
        let total: Duration = (0..self.reps).map(|_| self.pass_time()).sum();
        total.as_nanos() as f64 / (self.reps * self.packets.len()) as f64
    }
}

fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

struct Prepared {
    set: RuleSet,
    packets: Vec<Packet>,
    classifier: Classifier,
    compile: Duration,
    matched: usize,
}

fn prepare(i: usize, n: usize) -> Prepared {
    let set = rule_set(n, 0x9e37_79b9_7f4a_7c15 ^ n as u64);
    let packets = packets(&set, 0xd1b5_4a32_d192_ed03 ^ i as u64);
    let resolver = |name: &str| set.hosts.get(name).cloned();
    let compile_times: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            black_box(Classifier::compile(&set.rules, &set.dns, &resolver, POLICY));
            start.elapsed().as_secs_f64()
        })
        .collect();
    let compile = Duration::from_secs_f64(median(compile_times));
    let classifier = Classifier::compile(&set.rules, &set.dns, &resolver, POLICY);
    // The numbers mean nothing if the answers differ.
    let linear = LinearScan::new(&set.rules, &set.dns, &resolver, POLICY);
    let mut matched = 0;
    for &p in &packets {
        let v = classifier.lookup(p);
        assert_eq!(v, linear.lookup(p), "compiled and linear disagree on {p:?}");
        matched += usize::from(v.rule.is_some_and(|r| r + 1 < set.rules.len()));
    }
    Prepared {
        set,
        packets,
        classifier,
        compile,
        matched,
    }
}

const POLICY: UnresolvedPolicy = UnresolvedPolicy::BlockClient;

fn main() {
    let prepared: Vec<Prepared> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| prepare(i, n))
        .collect();

    // Compiled lookups: the sizes take turns within every round, so a noisy neighbour slows
    // them alike instead of skewing the ratio.
    let timers: Vec<_> = prepared
        .iter()
        .map(|p| Timer::new(&p.packets, |pk| p.classifier.lookup(pk)))
        .collect();
    let mut compiled: Vec<Vec<f64>> = vec![Vec::new(); timers.len()];
    for _ in 0..ROUNDS {
        for (t, samples) in timers.iter().zip(&mut compiled) {
            samples.push(t.round());
        }
    }
    let compiled: Vec<f64> = compiled.into_iter().map(median).collect();

    println!(
        "{:>6} | {:>18} | {:>16} | {:>12} | {:>16}",
        "rules", "compiled ns/lookup", "linear ns/lookup", "compile time", "classifier bytes"
    );
    println!("{}", "-".repeat(82));
    for ((p, &n), fast) in prepared.iter().zip(&SIZES).zip(&compiled) {
        let resolver = |name: &str| p.set.hosts.get(name).cloned();
        let linear = LinearScan::new(&p.set.rules, &p.set.dns, &resolver, POLICY);
        let timer = Timer::new(&p.packets, |pk| linear.lookup(pk));
        let slow = median((0..LINEAR_ROUNDS).map(|_| timer.round()).collect());
        println!(
            "{:>6} | {:>18.2} | {:>16.1} | {:>12} | {:>16}   ({} of {} packets hit a rule before the policy)",
            n,
            fast,
            slow,
            fmt_duration(p.compile),
            p.classifier.memory_bytes(),
            p.matched,
            p.packets.len()
        );
    }
    let ratio = compiled[compiled.len() - 1] / compiled[0];
    println!("ratio 10000/10 = {ratio:.2}x (target <= 3x)");
}
