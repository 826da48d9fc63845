//! The service's own endpoints, wired together: the engine's local delivery, the host stack
//! and the resolver. A service calls [`LocalServices::after_engine`] after each engine call
//! that may have delivered packets locally, and on its timer.

use std::net::IpAddr;

use qubes_engine::config::EngineConfig;
use qubes_engine::{Engine, Instant, Outbox};

use crate::hoststack::HostStack;
use crate::resolver::{Effect, Resolver};

/// The host stack and the resolver of one service.
#[derive(Debug)]
pub struct LocalServices {
    stack: HostStack,
    resolver: Resolver,
    /// Ports the resolver has open.
    ports: Vec<u16>,
}

/// The resolvers the service itself asks: the netvm's DNS keys, as the agent reads them
/// (`/qubes-primary-dns`, `/qubes-secondary-dns`), else the Qubes virtual DNS addresses.
pub fn dns_servers(tree: &std::collections::BTreeMap<String, String>) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = ["/qubes-primary-dns", "/qubes-secondary-dns"]
        .iter()
        .filter_map(|k| tree.get(*k))
        .filter_map(|a| a.parse().ok())
        .collect();
    if v.is_empty() {
        v = qubes_engine::config::VIRTUAL_DNS
            .iter()
            .map(|a| IpAddr::V4(*a))
            .collect();
    }
    v
}

impl LocalServices {
    pub fn new(now: Instant, cfg: &EngineConfig, servers: Vec<IpAddr>) -> Self {
        let u = &cfg.uplink;
        let v6 = u.ip6.zip(u.gateway6);
        let mut resolver = Resolver::new(servers.clone(), cfg.seed ^ 0xd15c);
        resolver.configure(servers, v6.is_some());
        LocalServices {
            stack: HostStack::new(now, cfg.seed, u.ip, u.gateway, v6, u.mtu),
            resolver,
            ports: Vec::new(),
        }
    }

    /// Follows a configuration change (our addresses, the DNS servers).
    pub fn configure(&mut self, cfg: &EngineConfig, servers: Vec<IpAddr>) {
        let u = &cfg.uplink;
        let v6 = u.ip6.zip(u.gateway6);
        self.stack.set_addresses(u.ip, u.gateway, v6, u.mtu);
        self.resolver.configure(servers, v6.is_some());
    }

    /// Starts a lookup the engine asked for.
    pub fn resolve(&mut self, now: Instant, name: &str) {
        self.resolver.lookup(now, name);
    }

    /// When the resolver next needs the timer.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.resolver.next_timeout()
    }

    /// Takes what the engine delivered locally in `delivered`, runs the host stack and the
    /// resolver, and hands finished lookups to the engine. What that sends lands in `out`.
    pub fn after_engine(
        &mut self,
        now: Instant,
        engine: &mut Engine,
        delivered: &Outbox,
        out: &mut Outbox,
    ) {
        self.stack.ingress(delivered);
        self.resolver.poll_timeouts(now);
        // Bounded: each round either moves packets or stops.
        for _ in 0..16 {
            self.run_effects(engine);
            let moved = self.stack.poll(now, engine, out);
            let mut got = false;
            for &port in &self.ports {
                while let Some((from, payload)) = self.stack.udp_recv(port) {
                    self.resolver.datagram(port, from, &payload);
                    got = true;
                }
            }
            while let Some((name, answer)) = self.resolver.poll_answer() {
                if answer.is_none() {
                    tracing::warn!(name, "name did not resolve; rules using it fail closed");
                }
                engine.dns_answer(now, &name, answer, out);
                got = true;
            }
            if !moved && !got {
                break;
            }
        }
        self.run_effects(engine);
        self.stack.poll(now, engine, out);
    }

    fn run_effects(&mut self, engine: &mut Engine) {
        while let Some(e) = self.resolver.poll_effect() {
            match e {
                Effect::Open(port) => {
                    if self.stack.udp_open(engine, port) {
                        self.ports.push(port);
                    }
                }
                Effect::Send { port, to, payload } => {
                    if !self.stack.udp_send(port, to, &payload) {
                        tracing::debug!(port, "DNS query could not be queued");
                    }
                }
                Effect::Close(port) => {
                    self.stack.udp_close(engine, port);
                    self.ports.retain(|&p| p != port);
                }
            }
        }
    }
}
