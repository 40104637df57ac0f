//! TLS for the HTTP client towards ClickHouse: rustls (ring), trusting either the system's
//! roots or the CA certificates of one PEM file; and telling a refused certificate apart from a
//! network failure.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// A rustls client configuration trusting the certificates in `ca_file`, or the system's roots
/// when there is none. Errors name `setting` and the path.
pub fn client_config(
    ca_file: Option<&Path>,
    setting: &str,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
            for certificate in certificates {
                let certificate = certificate.map_err(|e| {
                    format!("{setting}: {} is not PEM certificates: {e}", path.display())
                })?;
                roots.add(certificate).map_err(|e| {
                    format!(
                        "{setting}: {} holds an unusable certificate: {e}",
                        path.display()
                    )
                })?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "{setting}: {} holds no certificate",
                    path.display()
                ));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for certificate in native.certs {
                // A system store may hold certificates rustls cannot use; skip those.
                let _ = roots.add(certificate);
            }
            if roots.is_empty() {
                return Err(format!(
                    "no system root certificates were found: give {setting}"
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// A client configuration that trusts nobody, for connectors that will never make a TLS
/// connection (plain http:// URLs).
pub(crate) fn empty_client_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

/// What rustls said when it refused the peer (an untrusted, expired or misnamed certificate, or
/// a peer that does not speak TLS), if that is what `error` comes down to.
pub fn refusal(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(format!("TLS refused: {tls}"));
        }
        // tokio-rustls hands rustls errors up inside io::Error, and hyper-rustls wraps that in
        // another: an io::Error's source() skips the error it holds, so step into it instead.
        cause = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rustls_refusal_is_found_under_nested_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let nested =
            std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
        let reason = refusal(&nested).expect("found");
        assert!(reason.contains("UnknownIssuer"), "{reason}");
        assert_eq!(refusal(&std::io::Error::other("connection reset")), None);
    }
}
