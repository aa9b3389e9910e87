//! TLS on the peer links (`docs/protocol.md` §8.4): mutual TLS 1.3 (rustls, ring provider)
//! under the unchanged Hello/HMAC handshake, when `[cluster.tls]` is configured.
//!
//! - The dialer checks the acceptor's certificate against the CA bundle and requires it to be
//!   valid for the acceptor's configured node name (`[[server]] name`, as a subjectAltName
//!   dNSName).
//! - The acceptor requires a client certificate chaining to the CA bundle and, after the TLS
//!   handshake, valid for the dialer's configured node name too (same rule), so both ends are
//!   bound to the names the config gives them.
//! - No session resumption: every connection runs the full certificate checks.
//! - Before the TLS handshake the acceptor looks at the first byte the dialer sent (a TLS
//!   record starts with 0x16, a plain frame with the magic `NBMR`): a plain peer at a TLS node
//!   and a TLS peer at a plain node are refused with a log line naming the cause, and the
//!   plain side is told why with a plain Error frame. Nothing from such a peer is applied.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use mirror_proto::{error_code, Frame, Message};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{AlertDescription, ClientConfig, ServerConfig};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::LinkError;
use crate::config::{crypto_provider, Config, Tls, TlsMaterial};

/// A peer link's byte stream under TLS (either end).
pub(crate) type TlsStream = tokio_rustls::TlsStream<TcpStream>;

/// A link starting with a certificate that expires sooner than this logs a warning.
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// First byte of a TLS handshake record (content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The TLS settings of this node's peer links, built once from the checked
/// `[cluster.tls]` files and shared by the control link and every data link.
pub struct PeerTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    not_after: SystemTime,
    files: Tls,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("files", &self.files)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Reads and checks `config`'s `[cluster.tls]` files for node `node` and builds the TLS
    /// settings; `Ok(None)` without `[cluster.tls]`.
    ///
    /// Errors: [`LinkError::TlsConfig`] naming the file and the problem (see
    /// [`Config::read_tls`]).
    pub fn from_config(config: &Config, node: &str) -> Result<Option<Arc<PeerTls>>, LinkError> {
        match config
            .read_tls(node)
            .map_err(|e| LinkError::TlsConfig(Box::new(e)))?
        {
            None => Ok(None),
            Some(m) => PeerTls::new(m).map(|t| Some(Arc::new(t))),
        }
    }

    /// Builds the client (dialer) and server (acceptor) configurations: TLS 1.3 only, ring,
    /// our chain and key on both sides, the CA bundle as the only trust anchors, client
    /// certificates mandatory, no resumption.
    pub fn new(m: TlsMaterial) -> Result<PeerTls, LinkError> {
        let provider = crypto_provider();
        let cfg_err = |what: &str, e: &dyn fmt::Display| {
            LinkError::Config(format!(
                "TLS ({}, {}, {}): {what}: {e}",
                m.files.cert.display(),
                m.files.key.display(),
                m.files.ca.display()
            ))
        };
        let versions = [&rustls::version::TLS13];
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| cfg_err("client settings", &e))?
            .with_root_certificates(m.roots.clone())
            .with_client_auth_cert(m.cert_chain.clone(), m.key.clone_key())
            .map_err(|e| cfg_err("client certificate", &e))?;
        client.resumption = Resumption::disabled();
        // The acceptor needs no SNI; the names are in the certificates.
        client.enable_sni = false;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider.clone())
                .build()
                .map_err(|e| cfg_err("client certificate verifier", &e))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| cfg_err("server settings", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(m.cert_chain.clone(), m.key.clone_key())
            .map_err(|e| cfg_err("server certificate", &e))?;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(PeerTls {
            client: Arc::new(client),
            server: Arc::new(server),
            not_after: m.not_after,
            files: m.files,
        })
    }

    /// When this node's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The start-up log line of a link using these settings; a warning when the certificate
    /// expires within [`EXPIRY_WARNING`].
    pub(crate) fn log_start(&self, link: &str) {
        let left = self
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let days = left.as_secs() / 86_400;
        let cert = self.files.cert.display();
        if left < EXPIRY_WARNING {
            tracing::warn!(%link, %cert, days_left = days, "peer link uses TLS 1.3; this node's certificate expires soon");
        } else {
            tracing::info!(%link, %cert, days_left = days, "peer link uses TLS 1.3");
        }
    }
}

/// `peer_node` as the name its certificate must carry.
pub(crate) fn server_name(peer_node: &str) -> Result<ServerName<'static>, LinkError> {
    ServerName::try_from(peer_node.to_string()).map_err(|e| {
        LinkError::Config(format!(
            "peer node name \"{peer_node}\" cannot be checked against a TLS certificate \
             (it must be a DNS name): {e}"
        ))
    })
}

/// The dialer's side: TLS handshake as client, the peer's certificate checked against the CA
/// and `peer_node`.
pub(crate) async fn connect(
    tls: &PeerTls,
    stream: TcpStream,
    peer_node: &str,
    peer: &str,
) -> Result<TlsStream, LinkError> {
    let name = server_name(peer_node)?;
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    match connector.connect(name, stream).await {
        Ok(s) => Ok(TlsStream::Client(s)),
        Err(e) => Err(match rustls_cause(&e) {
            // A plain acceptor answers a ClientHello with a plain Error frame.
            Some(rustls::Error::InvalidMessage(_)) => LinkError::Tls {
                peer: peer.to_string(),
                detail: "peer did not start TLS: it answered with non-TLS data \
                         (is [cluster.tls] configured on the peer?)"
                    .to_string(),
            },
            _ => handshake_error(e, peer),
        }),
    }
}

/// The acceptor's side: refuses a peer that did not start TLS, then the TLS handshake as
/// server (client certificate required, checked against the CA), then checks that the
/// client certificate is valid for `peer_node`.
pub(crate) async fn accept(
    tls: &PeerTls,
    mut stream: TcpStream,
    peer_node: &str,
    peer: &str,
) -> Result<TlsStream, LinkError> {
    if first_byte(&stream, peer).await? != TLS_HANDSHAKE_RECORD {
        let text = "this node requires TLS on peer links ([cluster.tls]); the connection did \
                    not start TLS";
        refuse_plain(&mut stream, text).await;
        return Err(LinkError::Tls {
            peer: peer.to_string(),
            detail: "peer did not start TLS (it sent plain data: is [cluster.tls] configured \
                     on the peer?)"
                .to_string(),
        });
    }
    let name = server_name(peer_node)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let mut s = acceptor
        .accept(stream)
        .await
        .map_err(|e| handshake_error(e, peer))?;
    let checked = {
        let conn = s.get_ref().1;
        match conn.peer_certificates().and_then(|c| c.first()) {
            None => Err("the peer presented no certificate".to_string()),
            Some(ee) => ParsedCertificate::try_from(ee)
                .and_then(|p| rustls::client::verify_server_name(&p, &name))
                .map_err(|e| {
                    let e = match e {
                        rustls::Error::InvalidCertificate(c) => c.to_string(),
                        other => other.to_string(),
                    };
                    format!(
                        "the peer's certificate is not valid for the configured peer name \
                         \"{peer_node}\": {e}"
                    )
                }),
        }
    };
    if let Err(detail) = checked {
        // The peer completed TLS: tell it why, inside TLS, in the handshake's first frame.
        refuse_plain(
            &mut s,
            &format!(
                "refused by TLS name check: your certificate is not valid for \"{peer_node}\""
            ),
        )
        .await;
        return Err(LinkError::Tls {
            peer: peer.to_string(),
            detail: format!("TLS handshake failed: {detail}"),
        });
    }
    Ok(TlsStream::Server(s))
}

/// A plain acceptor's check: refuses a peer that started TLS (this node has no
/// `[cluster.tls]`). Costs one `peek` per connection, nothing per frame.
pub(crate) async fn refuse_if_tls(stream: &mut TcpStream, peer: &str) -> Result<(), LinkError> {
    if first_byte(stream, peer).await? == TLS_HANDSHAKE_RECORD {
        refuse_plain(
            stream,
            "this node does not use TLS on peer links ([cluster.tls] is not configured here)",
        )
        .await;
        return Err(LinkError::Tls {
            peer: peer.to_string(),
            detail: "peer started TLS, but [cluster.tls] is not configured on this node"
                .to_string(),
        });
    }
    Ok(())
}

/// Waits for the first byte the peer sends, without consuming it.
async fn first_byte(stream: &TcpStream, peer: &str) -> Result<u8, LinkError> {
    let mut b = [0u8; 1];
    match stream.peek(&mut b).await {
        Ok(0) => Err(LinkError::Closed {
            peer: peer.to_string(),
        }),
        Ok(_) => Ok(b[0]),
        Err(source) => Err(LinkError::Io {
            op: "read from",
            addr: peer.to_string(),
            source,
        }),
    }
}

/// Best effort: a handshake-time Error frame (seq 1, `CONFIG_MISMATCH`) with `text`, then
/// close. A plain peer reports it as the reason it was refused.
async fn refuse_plain<S: AsyncWrite + Unpin>(stream: &mut S, text: &str) {
    let frame = Frame::new(
        1,
        Message::Error {
            code: error_code::CONFIG_MISMATCH,
            message: text.to_string(),
        },
    );
    if let Ok(bytes) = frame.to_bytes() {
        let _ = stream.write_all(&bytes).await;
    }
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// The rustls error inside an I/O error from a TLS stream, if that is what it is.
fn rustls_cause(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Maps an error from a TLS handshake, or from a later read/write on a TLS stream, to the
/// link error naming its cause.
fn handshake_error(e: std::io::Error, peer: &str) -> LinkError {
    if let Some(r) = rustls_cause(&e) {
        return LinkError::Tls {
            peer: peer.to_string(),
            detail: format!("TLS handshake failed: {}", describe(r)),
        };
    }
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return LinkError::Closed {
            peer: peer.to_string(),
        };
    }
    LinkError::Io {
        op: "TLS handshake with",
        addr: peer.to_string(),
        source: e,
    }
}

/// An I/O error of the Hello/HMAC handshake run over TLS: a TLS failure inside it (in TLS
/// 1.3 the acceptor rejects the dialer's certificate only after the dialer finished its
/// side, so the dialer sees the alert on its first read) becomes [`LinkError::Tls`].
pub(crate) fn explain(e: LinkError) -> LinkError {
    match e {
        LinkError::Io { addr, source, .. } if rustls_cause(&source).is_some() => {
            handshake_error(source, &addr)
        }
        e => e,
    }
}

fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::AlertReceived(a) => {
            let cert = matches!(
                a,
                AlertDescription::BadCertificate
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::CertificateRevoked
                    | AlertDescription::CertificateExpired
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::UnknownCA
                    | AlertDescription::CertificateRequired
                    | AlertDescription::AccessDenied
                    | AlertDescription::DecryptError
            );
            if cert {
                format!("the peer rejected our certificate (alert {a:?})")
            } else {
                format!("the peer aborted the handshake (alert {a:?})")
            }
        }
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate".to_string(),
        rustls::Error::InvalidCertificate(c) => {
            format!(
                "the peer's certificate is not acceptable: {}",
                cert_error(c)
            )
        }
        other => other.to_string(),
    }
}

fn cert_error(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match c {
        C::UnknownIssuer => "it is not signed by a CA in our [cluster.tls] ca bundle \
                             (unknown issuer)"
            .to_string(),
        C::Expired | C::ExpiredContext { .. } => format!("it has expired ({c})"),
        C::NotValidYet | C::NotValidYetContext { .. } => format!("it is not valid yet ({c})"),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!("it is not valid for the peer's configured node name ({c})")
        }
        other => other.to_string(),
    }
}
