//! Cluster CA, node certificates and the rustls configurations built from them.
//!
//! A node's identity is the DNS subject alternative name `node-<id>.bd.local` in a certificate signed by the
//! cluster CA, with both ServerAuth and ClientAuth extended key usages: every node is both a QUIC server
//! (it accepts) and a client (it dials).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};
use crate::wire::ALPN;
use crate::NodeId;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node.key";

/// Subject name of the CA; `issue_cert` rebuilds the issuer from it (rcgen signs with the issuer's name and key).
const CA_COMMON_NAME: &str = "bd cluster CA";
/// Node certificates outlive any realistic deployment without rotation tooling; rotation = issue a new one.
const NODE_CERT_VALID_YEARS: i32 = 10;
const CA_VALID_YEARS: i32 = 30;

/// The name a node's certificate carries and that dialers verify: `node-<id>.bd.local`.
pub fn node_dns_name(node: NodeId) -> String {
    format!("node-{node}.bd.local")
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to a new file; fails if it exists so that a CA or key is never silently replaced.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(contents).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("syncing", path))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn validity(params: &mut CertificateParams, years: i32) {
    // Backdated by a day so that peers with slightly skewed clocks accept a freshly issued cert.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs as i64 / 86_400 - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    // Feb 29 + N years may not exist; the 28th always does.
    params.not_after = rcgen::date_time_ymd(y + years, m, d.min(28));
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar (H. Hinnant's algorithm);
/// rcgen takes calendar dates and this avoids a direct dependency on the `time` crate.
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

/// Creates a cluster CA in `dir` (`ca.pem`, `ca.key` with mode 0600). Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    validity(&mut params, CA_VALID_YEARS);
    let cert = params.self_signed(&key)?;
    let cert_path = dir.join(CA_CERT_FILE);
    write_new(
        &dir.join(CA_KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// Issues a certificate for `node` signed by the CA in `ca_dir`, writing `node.pem`, `node.key` (0600) and a
/// copy of `ca.pem` into `out_dir` — everything [`NodeIdentity::load`] needs. Refuses to overwrite.
pub fn issue_cert(ca_dir: &Path, node: NodeId, out_dir: &Path) -> Result<()> {
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err("reading", &ca_cert_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err("reading", &ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    // rcgen 0.13 signs with an issuer `Certificate`; re-self-signing our fixed CA params with the CA key
    // reproduces the issuer name and key identifier. The chain check below catches a foreign ca.pem.
    let issuer = ca_params().self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_dns_name(node));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(node_dns_name(node).try_into()?)];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, NODE_CERT_VALID_YEARS);
    let cert = params.signed_by(&key, &issuer, &ca_key)?;

    let roots = roots_from_pem(ca_pem.as_bytes(), &ca_cert_path)?;
    verify_chain(cert.der(), &roots).map_err(|e| {
        Error::Tls(format!(
            "issued cert does not verify against {}: {e}",
            ca_cert_path.display()
        ))
    })?;

    fs::create_dir_all(out_dir).map_err(io_err("creating directory", out_dir))?;
    write_new(
        &out_dir.join(NODE_KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&out_dir.join(NODE_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    let ca_copy = out_dir.join(CA_CERT_FILE);
    if ca_copy != ca_cert_path {
        match fs::read_to_string(&ca_copy) {
            Ok(existing) if existing == ca_pem => {}
            Ok(_) => {
                return Err(Error::Config(format!(
                    "{} exists and is a different CA",
                    ca_copy.display()
                )))
            }
            Err(_) => write_new(&ca_copy, ca_pem.as_bytes(), 0o644)?,
        }
    }
    Ok(())
}

fn roots_from_pem(pem: &[u8], path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::MissingPem {
            what: "CA certificate",
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

fn verify_chain(cert: &CertificateDer<'_>, roots: &RootCertStore) -> Result<(), rustls::Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &[],
        UnixTime::now(),
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
    )
}

/// True if `cert` carries the identity of `node`. Only meaningful for a certificate whose chain the TLS layer
/// already verified (the server's `WebPkiClientVerifier` or the client's server verifier).
pub fn cert_names_node(cert: &CertificateDer<'_>, node: NodeId) -> bool {
    let Ok(parsed) = ParsedCertificate::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(node_dns_name(node)) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &name).is_ok()
}

/// The certificates a peer presented, as quinn reports them after the handshake.
pub fn peer_certs(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}

/// A node's TLS identity: its certificate chain and key, and the cluster CA it trusts.
#[derive(Debug)]
pub struct NodeIdentity {
    pub node: NodeId,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            node: self.node,
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
        }
    }
}

impl NodeIdentity {
    /// Loads `node.pem`, `node.key` and `ca.pem` from `dir` (as written by [`issue_cert`]) and checks that the
    /// certificate names `node` and chains to the CA, so that a misconfiguration fails at startup, not at
    /// the first connection.
    pub fn load(dir: &Path, node: NodeId) -> Result<NodeIdentity> {
        let cert_path = dir.join(NODE_CERT_FILE);
        let key_path = dir.join(NODE_KEY_FILE);
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_pem = fs::read(&cert_path).map_err(io_err("reading", &cert_path))?;
        let key_pem = fs::read(&key_path).map_err(io_err("reading", &key_path))?;
        let ca_pem = fs::read(&ca_path).map_err(io_err("reading", &ca_path))?;
        let cert_chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("{}: {e}", cert_path.display())))?;
        if cert_chain.is_empty() {
            return Err(Error::MissingPem {
                what: "certificate",
                path: cert_path,
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| Error::Tls(format!("{}: {e}", key_path.display())))?;
        let roots = roots_from_pem(&ca_pem, &ca_path)?;
        if !cert_names_node(&cert_chain[0], node) {
            return Err(Error::Config(format!(
                "{} does not name node {node} (expected SAN {})",
                cert_path.display(),
                node_dns_name(node)
            )));
        }
        verify_chain(&cert_chain[0], &roots).map_err(|e| {
            Error::Tls(format!(
                "{} does not verify against {}: {e}",
                cert_path.display(),
                ca_path.display()
            ))
        })?;
        Ok(NodeIdentity {
            node,
            cert_chain,
            key,
            roots: Arc::new(roots),
        })
    }
}

/// How a transport authenticates peers.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual TLS with the cluster CA. The only mode for anything but a local dev cluster.
    MutualTls(NodeIdentity),
    /// Self-signed certificate, no verification in either direction, node id taken on trust from the hello.
    /// Refused unless the endpoint binds a loopback address.
    InsecureLoopback,
}

fn tls13_server(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>> {
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))
}

fn tls13_client(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))
}

/// The rustls server configuration: client certificates are required and verified against the cluster CA.
pub fn server_crypto(security: &Security) -> Result<rustls::ServerConfig> {
    let provider = ring();
    let mut cfg = match security {
        Security::MutualTls(id) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| Error::Tls(e.to_string()))?;
            tls13_server(provider)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(id.cert_chain.clone(), id.key.clone_key())
                .map_err(|e| Error::Tls(e.to_string()))?
        }
        Security::InsecureLoopback => {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
            let key = PrivateKeyDer::try_from(cert.key_pair.serialize_der())
                .map_err(|e| Error::Tls(e.to_string()))?;
            tls13_server(provider)?
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)
                .map_err(|e| Error::Tls(e.to_string()))?
        }
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The rustls client configuration: presents the node certificate and verifies the server against the CA
/// (and, through the server name used when dialing, that it is the node we meant to reach).
pub fn client_crypto(security: &Security) -> Result<rustls::ClientConfig> {
    let provider = ring();
    let mut cfg = match security {
        Security::MutualTls(id) => tls13_client(provider)?
            .with_root_certificates(id.roots.clone())
            .with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())
            .map_err(|e| Error::Tls(e.to_string()))?,
        Security::InsecureLoopback => tls13_client(provider.clone())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Insecure mode's server verifier: accepts any certificate. Exists only for the loopback dev cluster.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_cert_names_its_node_only_and_chains_to_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        assert!(
            init_ca(&ca).is_err(),
            "an existing CA must not be overwritten"
        );
        let n7 = dir.path().join("n7");
        issue_cert(&ca, 7, &n7).unwrap();
        let id = NodeIdentity::load(&n7, 7).unwrap();
        assert!(cert_names_node(&id.cert_chain[0], 7));
        assert!(!cert_names_node(&id.cert_chain[0], 8));
        assert!(!cert_names_node(&id.cert_chain[0], 70));
        let err = NodeIdentity::load(&n7, 8).unwrap_err();
        assert!(err.to_string().contains("does not name node 8"), "{err}");

        let other_ca = dir.path().join("other");
        init_ca(&other_ca).unwrap();
        let other_roots =
            roots_from_pem(&fs::read(other_ca.join(CA_CERT_FILE)).unwrap(), &other_ca).unwrap();
        assert!(verify_chain(&id.cert_chain[0], &other_roots).is_err());
        assert!(verify_chain(&id.cert_chain[0], &id.roots).is_ok());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        issue_cert(dir.path(), 1, &dir.path().join("n1")).unwrap();
        for p in [
            dir.path().join(CA_KEY_FILE),
            dir.path().join("n1").join(NODE_KEY_FILE),
        ] {
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }
}
