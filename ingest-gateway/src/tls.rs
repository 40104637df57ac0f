//! HTTPS for the gateway: the certificate and key read from two PEM files, a listener that
//! completes each TLS handshake before axum sees the connection, and a reload of the two files
//! (on SIGHUP) that changes the certificate for new connections only.
//!
//! Data path of a connection: TCP accepted → TLS handshake on a task of its own (a slow or
//! plaintext client delays nobody else, and is dropped after [`HANDSHAKE_TIMEOUT`]) → the
//! certificate chosen by [`CertificateStore`], whichever pair was loaded last → ALPN picks h2 or
//! HTTP/1.1 → axum serves it like a plain connection.
//!
//! Invariant: a file's contents never reach an error or a log line, only the setting's name and
//! the file's path; a reload that fails leaves the certificate that was serving in place.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The environment variable of the certificate chain's file, as errors name it.
pub const CERT_SETTING: &str = "BIOFEED_GATEWAY_TLS_CERT_FILE";
/// The environment variable of the private key's file, as errors name it.
pub const KEY_SETTING: &str = "BIOFEED_GATEWAY_TLS_KEY_FILE";

/// How long a client has to complete the TLS handshake before its connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate or key that cannot serve: the operator must fix the file (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    // The cause is part of the message (not a `source`): the reload's log line shows it too.
    #[error("cannot read {setting} ({}): {cause}", path.display())]
    Read {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        cause: io::Error,
    },
    /// The file was read but holds nothing usable.
    #[error("{setting} ({}) {reason}", path.display())]
    Invalid {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, without the file's contents.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error(
        "the private key in {KEY_SETTING} ({}) does not belong to the certificate in {CERT_SETTING} ({})",
        key.display(),
        cert.display()
    )]
    Mismatch {
        /// The certificate's file.
        cert: PathBuf,
        /// The key's file.
        key: PathBuf,
    },
    /// rustls refused the server configuration (not expected with the ring provider).
    #[error("cannot configure TLS: {0}")]
    Config(rustls::Error),
}

/// The two files a certificate comes from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM: the server's certificate first, then the intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The certificate the gateway presents, replaceable while it serves: each new handshake takes
/// the pair loaded last; connections already open keep theirs.
#[derive(Debug)]
pub struct CertificateStore {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertificateStore {
    /// Reads the certificate chain and key, and checks that they belong together.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = RwLock::new(Arc::new(read_pair(&files, &provider)?));
        Ok(Arc::new(Self {
            files,
            provider,
            current,
        }))
    }

    /// Reads the two files again; on success new handshakes present the new certificate, on
    /// failure the one loaded before keeps serving.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = Arc::new(read_pair(&self.files, &self.provider)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = pair;
        Ok(())
    }

    /// The server configuration: this store's certificate, TLS 1.2 and 1.3, ALPN h2 and
    /// HTTP/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// Reads and checks one certificate chain and its key.
fn read_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let invalid = |setting, path: &Path, reason: &str| TlsError::Invalid {
        setting,
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let cert_pem = read(CERT_SETTING, &files.cert)?;
    // The PEM parser's own errors may quote the file; only the kind of failure is reported.
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid(CERT_SETTING, &files.cert, "is not a PEM file"))?;
    if chain.is_empty() {
        return Err(invalid(
            CERT_SETTING,
            &files.cert,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    let key_pem = read(KEY_SETTING, &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        invalid(
            KEY_SETTING,
            &files.key,
            "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
        )
    })?;
    let key = provider.key_provider.load_private_key(key).map_err(|_| {
        invalid(
            KEY_SETTING,
            &files.key,
            "holds a private key of a kind that cannot sign (RSA, ECDSA P-256/P-384 or Ed25519 expected)",
        )
    })?;
    let pair = CertifiedKey::new(chain, key);
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
        Err(_) => Err(invalid(
            CERT_SETTING,
            &files.cert,
            "holds a first certificate that is not a valid X.509 certificate",
        )),
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|cause| TlsError::Read {
        setting,
        path: path.to_owned(),
        cause,
    })
}

/// A listener that hands axum only connections whose TLS handshake completed. Handshakes run on
/// tasks of their own; dropping the listener stops accepting.
pub struct TlsListener {
    established: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Accepts on `listener`, completing each handshake with `config`.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (ready, established) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), ready));
        Ok(Self {
            established,
            local_addr,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.established.recv().await {
            Some(connection) => connection,
            // The accepting task holds a sender until the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                wait_after_accept_error(e).await;
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // The listener is gone only when the gateway stops taking connections.
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "tls handshake failed"),
                Err(_) => tracing::debug!("tls handshake timed out"),
            }
        });
    }
}

/// As axum's own TCP listener does: a connection that died before it was accepted is nobody's
/// business; anything else (e.g. out of file descriptors) is logged and waited out.
async fn wait_after_accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept a connection; retrying in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
