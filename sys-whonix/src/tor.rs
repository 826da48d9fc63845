//! The gateway's Tor client: one arti `TorClient` (arti-client 0.47), configured from our own
//! settings, bootstrapped with its progress reported, and streams opened with a per-client
//! isolation token so that two client qubes never share a circuit.
//!
//! The settings name the state and cache directories and the Tor network: the public one
//! (arti's built-in authorities and fallbacks), or a private one given by its authorities' v3
//! identities and its fallback caches, for tests against a network of our own (arti's
//! `[tor_network]` section; its `path_rules` then allow relays that share an address, as
//! every relay of a test network on one loopback does).

use std::path::PathBuf;
use std::sync::Arc;

use arti_client::config::TorClientConfigBuilder;
use arti_client::{
    DangerouslyIntoTorAddr, DataStream, IsolationToken, StreamPrefs, TorClient, TorClientConfig,
};
use futures::StreamExt;

/// A relay a client may ask for the directory first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackCache {
    /// RSA identity fingerprint, hex.
    pub rsa_identity: String,
    /// ed25519 identity, base64.
    pub ed_identity: String,
    /// `address:port` of its OR port.
    pub orport: String,
}

/// Which Tor network to use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// The public Tor network, as arti knows it.
    #[default]
    Public,
    /// A network of one's own (tests): its authorities' v3 identities and fallback caches.
    Private {
        authorities: Vec<String>,
        fallbacks: Vec<FallbackCache>,
    },
}

/// What the gateway's Tor client is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorSettings {
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub network: Network,
    /// Skip arti's checks of who may write the directories (fs-mistrust). For tests in
    /// temporary directories only: a gateway's state must not be writable by others.
    pub trust_storage_permissions: bool,
}

/// Why the Tor client could not be made or used.
#[derive(Debug)]
pub enum TorError {
    /// The settings do not make an arti configuration; says what arti objected to.
    Config(String),
    /// arti could not start or bootstrap.
    Client(arti_client::Error),
}

impl std::fmt::Display for TorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TorError::Config(e) => write!(f, "the Tor client's configuration: {e}"),
            TorError::Client(e) => write!(f, "the Tor client: {e}"),
        }
    }
}

impl std::error::Error for TorError {}

impl TorError {
    /// Whether the exit said the name does not exist (a DNS answer's NXDOMAIN), rather than
    /// Tor failing to ask (SERVFAIL).
    pub fn is_not_found(&self) -> bool {
        use arti_client::HasKind;
        matches!(self, TorError::Client(e) if e.kind() == arti_client::ErrorKind::RemoteHostNotFound)
    }
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl TorSettings {
    /// The settings a configuration file's `tor` section gives.
    pub fn from_section(t: &qubes_service_runtime::config_file::TorSection) -> TorSettings {
        TorSettings {
            state_dir: t.state_dir.clone(),
            cache_dir: t.cache_dir.clone(),
            network: match &t.network {
                None => Network::Public,
                Some(n) => Network::Private {
                    authorities: n.authorities.clone(),
                    fallbacks: n
                        .fallbacks
                        .iter()
                        .map(|f| FallbackCache {
                            rsa_identity: f.rsa_identity.clone(),
                            ed_identity: f.ed_identity.clone(),
                            orport: f.orport.clone(),
                        })
                        .collect(),
                },
            },
            trust_storage_permissions: t.trust_storage_permissions,
        }
    }

    /// The arti configuration, written as arti's own TOML and read by its builder, so that
    /// arti checks every value the way its documentation describes.
    pub fn arti_config(&self) -> Result<TorClientConfig, TorError> {
        let mut t = String::new();
        t.push_str("[storage]\n");
        t.push_str(&format!(
            "cache_dir = {}\nstate_dir = {}\n",
            toml_str(&self.cache_dir.to_string_lossy()),
            toml_str(&self.state_dir.to_string_lossy())
        ));
        if self.trust_storage_permissions {
            t.push_str("permissions = { dangerously_trust_everyone = true }\n");
        }
        if let Network::Private {
            authorities,
            fallbacks,
        } = &self.network
        {
            if authorities.is_empty() || fallbacks.is_empty() {
                return Err(TorError::Config(
                    "a private network needs at least one authority and one fallback cache".into(),
                ));
            }
            let fb: Vec<String> = fallbacks
                .iter()
                .map(|f| {
                    format!(
                        "{{ rsa_identity = {}, ed_identity = {}, orports = [{}] }}",
                        toml_str(&f.rsa_identity),
                        toml_str(&f.ed_identity),
                        toml_str(&f.orport)
                    )
                })
                .collect();
            let auths: Vec<String> = authorities.iter().map(|a| toml_str(a)).collect();
            t.push_str(&format!(
                "[tor_network]\nfallback_caches = [{}]\nauthorities = {{ v3idents = [{}] }}\n",
                fb.join(", "),
                auths.join(", ")
            ));
            // Relays of a test network share one address: the family rule (same /16) would
            // leave no path; a prefix longer than the address turns it off.
            t.push_str(
                "[path_rules]\nipv4_subnet_family_prefix = 33\nipv6_subnet_family_prefix = 129\n",
            );
        }
        let builder: TorClientConfigBuilder =
            toml::from_str(&t).map_err(|e| TorError::Config(e.to_string()))?;
        builder.build().map_err(|e| TorError::Config(e.to_string()))
    }
}

/// The gateway's Tor client.
#[derive(Clone)]
pub struct Tor {
    client: Arc<TorClient<tor_rtcompat::PreferredRuntime>>,
}

impl std::fmt::Debug for Tor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tor").finish_non_exhaustive()
    }
}

impl Tor {
    /// Makes the client and bootstraps it, calling `progress` with arti's bootstrap status
    /// as it changes (what `sys-whonix status` and the logs show). Needs a tokio runtime.
    pub async fn bootstrap(
        settings: &TorSettings,
        mut progress: impl FnMut(String) + Send + 'static,
    ) -> Result<Tor, TorError> {
        // arti with rustls needs a process-wide crypto provider before any TLS; a second
        // install (another client in the same process) is refused, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cfg = settings.arti_config()?;
        let client = TorClient::builder()
            .config(cfg)
            .create_unbootstrapped()
            .map_err(TorError::Client)?;
        let mut events = client.bootstrap_events();
        tokio::spawn(async move {
            let mut last = String::new();
            while let Some(st) = events.next().await {
                let now = st.to_string();
                if now != last {
                    progress(now.clone());
                    last = now;
                }
            }
        });
        client.bootstrap().await.map_err(TorError::Client)?;
        Ok(Tor { client })
    }

    /// A TCP stream through Tor to `addr:port` (an IP address, as transparent proxying
    /// gives it), on circuits only `isolation` shares.
    pub async fn connect(
        &self,
        addr: std::net::SocketAddr,
        isolation: IsolationToken,
    ) -> Result<DataStream, TorError> {
        let mut prefs = StreamPrefs::new();
        prefs.set_isolation(isolation);
        let target = addr
            .into_tor_addr_dangerously()
            .map_err(|e| TorError::Config(format!("{addr}: {e}")))?;
        self.client
            .connect_with_prefs(target, &prefs)
            .await
            .map_err(TorError::Client)
    }

    /// A TCP stream through Tor to a host name (an onion service's, mapped back from its
    /// virtual address), on circuits only `isolation` shares.
    pub async fn connect_host(
        &self,
        host: &str,
        port: u16,
        isolation: IsolationToken,
    ) -> Result<DataStream, TorError> {
        let mut prefs = StreamPrefs::new();
        prefs.set_isolation(isolation);
        prefs.connect_to_onion_services(arti_client::config::BoolOrAuto::Explicit(true));
        self.client
            .connect_with_prefs((host, port), &prefs)
            .await
            .map_err(TorError::Client)
    }

    /// A name's addresses, resolved by an exit (RELAY_RESOLVE), on `isolation`'s circuits.
    pub async fn resolve(
        &self,
        name: &str,
        isolation: IsolationToken,
    ) -> Result<Vec<std::net::IpAddr>, TorError> {
        let mut prefs = StreamPrefs::new();
        prefs.set_isolation(isolation);
        self.client
            .resolve_with_prefs(name, &prefs)
            .await
            .map_err(TorError::Client)
    }

    /// An address's names, reverse-resolved by an exit, on `isolation`'s circuits.
    pub async fn resolve_ptr(
        &self,
        addr: std::net::IpAddr,
        isolation: IsolationToken,
    ) -> Result<Vec<String>, TorError> {
        let mut prefs = StreamPrefs::new();
        prefs.set_isolation(isolation);
        self.client
            .resolve_ptr_with_prefs(addr, &prefs)
            .await
            .map_err(TorError::Client)
    }

    /// The circuit a stream is attached to, as arti names it (`Circ 3.0`): what `status`
    /// shows beside each stream, and how two streams are seen to share a circuit or not.
    pub fn circuit_of(stream: &DataStream) -> Option<String> {
        use tor_proto::client::stream::ClientStreamCtrl;
        let tunnel = stream.client_stream_ctrl()?.tunnel()?;
        Some(tunnel.unique_id().to_string())
    }

    /// arti's bootstrap status, as `status` shows it.
    pub fn status(&self) -> String {
        self.client.bootstrap_status().to_string()
    }
}
