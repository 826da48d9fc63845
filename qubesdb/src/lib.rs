//! QubesDB, the key/value store dom0 fills for every qube: its wire protocol, the database,
//! a daemon on a local UNIX socket, and a blocking client.
//!
//! - [`wire`]: the 72-byte header and its messages, encoding and incremental decoding;
//! - [`tree`]: the database and its watches, pure (commands in, messages out);
//! - [`server`]: the daemon (`qubesdb-daemon`), one thread per connection;
//! - [`client`]: the client library (what `qubesdb-read` & co. use upstream);
//! - [`load`]: `key value` files to pre-load the daemon with;
//! - [`link`]: what a qube's daemon and dom0's exchange over their vchan, pure.
//!
//! Reference: qubes-core-qubesdb (`include/qubesdb.h`, `daemon/db-cmds.c`) and mirage-qubes
//! `lib/db.ml`; what we accept and refuse is in docs/qubesdb.md.

pub mod client;
pub mod link;
pub mod load;
pub mod server;
pub mod tree;
pub mod wire;

pub use client::{Client, ClientError, DEFAULT_SOCKET};
pub use server::{LinkPort, LocalWriter, Server, ServerError, ServerHandle};
pub use tree::{ConnId, Outcome, RequestError, Tree};
pub use wire::{Decoder, Header, Message, MsgType, WireError, HEADER_LEN, MAX_DATA, MAX_PATH_LEN};
