//! The TLS client shared by the probe and the list fetcher: rustls with
//! the ring provider, Mozilla's roots built in (so the result does not
//! depend on the machine's certificate store), and extra roots from a PEM
//! file for a private CA.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// The only application protocol offered: the exchanges are HTTP/1.1, so a
/// server that would pick HTTP/2 must not be allowed to.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// The TLS client configuration: the public roots (Mozilla's, built in,
/// so the result does not depend on the machine's certificate store) and
/// `extra_roots`, HTTP/1.1 as the only ALPN protocol.
pub(crate) fn tls_connector(
    extra_roots: &[CertificateDer<'static>],
) -> Result<TlsConnector, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // Each extra root was checked when the CA file was read
    // ([`load_ca_file`]), so none is dropped here.
    roots.add_parsable_certificates(extra_roots.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS setup: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The certificates of a PEM file, each one checked to be usable as a
/// trust anchor.
pub(crate) fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|error| error.to_string())?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("not PEM: {error}"))?;
    if certificates.is_empty() {
        return Err("no CERTIFICATE in it".to_owned());
    }
    let mut check = RootCertStore::empty();
    for (index, certificate) in certificates.iter().enumerate() {
        check
            .add(certificate.clone())
            .map_err(|error| format!("certificate {}: {error}", index + 1))?;
    }
    Ok(certificates)
}

/// The name a certificate must be valid for, sent as SNI (an IP address is
/// verified but not sent, as TLS has no SNI for addresses).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host)
        .map(|name| name.to_owned())
        .map_err(|_| format!("{host:?} is neither a DNS name nor an IP address"))
}
