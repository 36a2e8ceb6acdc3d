//! braid credentials and TLS configurations.
//!
//! `init` creates a private certificate authority and, signed by it, one server certificate and
//! one client certificate, in one directory:
//!
//! ```text
//! ca.pem  ca.key          the authority (keep ca.key on the machine that issues certificates)
//! server.pem server.key   for `braid serve`
//! client.pem client.key   for `braid mount` (copy ca.pem, client.pem, client.key to clients)
//! ```
//!
//! Both sides speak TLS 1.3 only and authenticate each other: the server accepts only clients
//! whose certificate the authority signed, the client only a server whose certificate the
//! authority signed for the name or address it connects to.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub use rustls::{ClientConfig, ServerConfig};

const CA_NAME: &str = "braid certificate authority";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid server name or address for TLS")]
    ServerName(String),
    #[error("{path} already holds credentials; remove them or pass --force to replace them")]
    Exists { path: PathBuf },
}

/// What `init` wrote.
#[derive(Debug)]
pub struct Issued {
    pub files: Vec<PathBuf>,
}

/// Creates a certificate authority, a server certificate valid for `server_names` (host names
/// or IP addresses) and a client certificate named `client_name`, in `dir`.
pub fn init(dir: &Path, server_names: &[String], client_name: &str, force: bool) -> Result<Issued, TlsError> {
    if dir.join("ca.key").exists() && !force {
        return Err(TlsError::Exists { path: dir.to_path_buf() });
    }
    create_private_dir(dir)?;
    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params();
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut files = vec![
        write_file(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?,
        write_file(&dir.join("ca.key"), issuer.key().serialize_pem().as_bytes(), 0o600)?,
    ];
    files.extend(issue(dir, "server", server_names, "braid server", ExtendedKeyUsagePurpose::ServerAuth, &issuer)?);
    files.extend(issue(dir, "client", &[], client_name, ExtendedKeyUsagePurpose::ClientAuth, &issuer)?);
    Ok(Issued { files })
}

/// Issues one more client certificate (`<name>.pem`, `<name>.key`) from the authority in `dir`.
pub fn issue_client(dir: &Path, name: &str) -> Result<Issued, TlsError> {
    let key_path = dir.join("ca.key");
    let pem = fs::read_to_string(&key_path).map_err(|source| TlsError::Io { path: key_path.clone(), source })?;
    let ca_key = KeyPair::from_pem(&pem).map_err(|e| TlsError::BadFile { path: key_path, reason: e.to_string() })?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let files = issue(dir, name, &[], name, ExtendedKeyUsagePurpose::ClientAuth, &issuer)?;
    Ok(Issued { files })
}

/// TLS 1.3 server configuration from `dir`: `server.pem`, `server.key`, and `ca.pem` to verify
/// clients. Clients without a certificate signed by that authority are refused.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let roots = Arc::new(load_roots(&dir.join("ca.pem"))?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&dir.join("server.pem"))?, load_key(&dir.join("server.key"))?)?;
    Ok(Arc::new(config))
}

/// TLS 1.3 client configuration from `dir`: `client.pem`, `client.key`, and `ca.pem` to verify
/// the server.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(load_roots(&dir.join("ca.pem"))?)
        .with_client_auth_cert(load_certs(&dir.join("client.pem"))?, load_key(&dir.join("client.key"))?)?;
    Ok(Arc::new(config))
}

/// The name to verify the server's certificate against: the host part of `host:port`.
pub fn server_name(address: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match address.rsplit_once(':') {
        Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => address,
    };
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

/// Whether `dir` holds what `server_config` needs.
pub fn has_server_credentials(dir: &Path) -> bool {
    ["ca.pem", "server.pem", "server.key"].iter().all(|f| dir.join(f).is_file())
}

/// Whether `dir` holds what `client_config` needs.
pub fn has_client_credentials(dir: &Path) -> bool {
    ["ca.pem", "client.pem", "client.key"].iter().all(|f| dir.join(f).is_file())
}

/// aws-lc-rs's TLS 1.3 suites with AES-128-GCM first: with AES instructions it is the fastest, and
/// file data is the bulk of what braid encrypts.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(provider)
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn issue(
    dir: &Path,
    file_stem: &str,
    names: &[String],
    common_name: &str,
    purpose: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<Vec<PathBuf>, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    let cert = params.signed_by(&key, issuer)?;
    Ok(vec![
        write_file(&dir.join(format!("{file_stem}.pem")), cert.pem().as_bytes(), 0o644)?,
        write_file(&dir.join(format!("{file_stem}.key")), key.serialize_pem().as_bytes(), 0o600)?,
    ])
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(|source| TlsError::Io { path: dir.to_path_buf(), source })
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, TlsError> {
    let io_err = |source| TlsError::Io { path: path.to_path_buf(), source };
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_err)?;
    io::Write::write_all(&mut file, contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(path.to_path_buf())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::BadFile { path: path.to_path_buf(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::BadFile { path: path.to_path_buf(), reason: e.to_string() })
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadFile { path: path.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_usable_credentials_and_refuses_to_overwrite() {
        // Goal: init gives a server and a client configuration that load; a second init does
        // not silently replace the authority. Method: init into a temp dir, build both configs.
        let dir = tempfile::tempdir().unwrap();
        let issued = init(dir.path(), &["localhost".into(), "127.0.0.1".into()], "test client", false).unwrap();
        assert_eq!(issued.files.len(), 6);
        server_config(dir.path()).unwrap();
        client_config(dir.path()).unwrap();
        assert!(matches!(init(dir.path(), &[], "c", false), Err(TlsError::Exists { .. })));
        issue_client(dir.path(), "laptop").unwrap();
        assert!(dir.path().join("laptop.pem").is_file());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "private keys are readable by their owner only");
    }

    #[test]
    fn server_names_come_from_the_address() {
        assert_eq!(server_name("127.0.0.1:7700").unwrap(), ServerName::try_from("127.0.0.1").unwrap());
        assert_eq!(server_name("files.example:7700").unwrap(), ServerName::try_from("files.example").unwrap());
        assert_eq!(server_name("[::1]:7700").unwrap(), ServerName::try_from("::1").unwrap());
        assert!(server_name("bad name:1").is_err());
    }
}
