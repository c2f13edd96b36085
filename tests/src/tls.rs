//! Certificates for the TLS tests, made in the test with rcgen (a CA, and leaf certificates for
//! 127.0.0.1 and localhost that it signs, written as PEM files), and clients that speak TLS to a
//! role: a tonic channel, and a bare handshake that reports the server's certificate or why the
//! server refused this client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority living in a test's temp dir.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate (PEM file).
    pub ca_path: PathBuf,
    dir: PathBuf,
    name: String,
}

/// A leaf certificate and its key, as files and as bytes.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate in DER, as a server presents it.
    pub der: Vec<u8>,
}

impl TestCa {
    /// A new CA whose files go to `dir`, named after `name`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_path, cert.pem()).expect("writing the CA");
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            ca_path,
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// A certificate for localhost and 127.0.0.1 with the subject `cn` and the mesh `roles`
    /// (`frontend`, `gate`, `expert`, `client`: URI SANs `spiffe://moemesh/role/<role>`), good as
    /// server and client, written to `<ca name>-<file>.pem` and `<ca name>-<file>-key.pem`
    /// (replacing them).
    pub fn leaf(&self, file: &str, cn: &str, roles: &[&str]) -> Leaf {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("names");
        params.subject_alt_names.push(rcgen::SanType::IpAddress(
            std::net::Ipv4Addr::LOCALHOST.into(),
        ));
        for role in roles {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(format!("spiffe://moemesh/role/{role}"))
                    .expect("an ASCII URI"),
            ));
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let leaf = Leaf {
            cert: self.dir.join(format!("{}-{file}.pem", self.name)),
            key: self.dir.join(format!("{}-{file}-key.pem", self.name)),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.key, key.serialize_pem()).expect("writing the key");
        std::fs::write(&leaf.cert, cert.pem()).expect("writing the certificate");
        leaf
    }

    /// `--tls-cert`, `--tls-key` and `--tls-ca` for a role holding `leaf`.
    pub fn flags(&self, leaf: &Leaf) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            leaf.cert.display().to_string(),
            "--tls-key".into(),
            leaf.key.display().to_string(),
            "--tls-ca".into(),
            self.ca_path.display().to_string(),
        ]
    }
}

fn pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A tonic channel to `addr` over TLS, trusting `ca`, presenting `identity` if given.
pub async fn channel(
    addr: &str,
    ca: &TestCa,
    identity: Option<&Leaf>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(&ca.ca_path)));
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(pem(&leaf.cert), pem(&leaf.key)));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await
}

/// Opens a TLS connection to `addr` as a gRPC client would (ALPN h2, the HTTP/2 preface) and
/// waits for the server's first bytes. `Ok` holds the server's certificate (DER) once the server
/// has accepted this client; `Err` is why not. Under TLS 1.3 a server refuses a client
/// certificate after the client's side of the handshake is done, so the refusal shows up as an
/// alert on the first read.
pub async fn probe(addr: &str, ca: &TestCa, identity: Option<&Leaf>) -> std::io::Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem(&ca.ca_path)) {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => {
            let chain = CertificateDer::pem_slice_iter(&pem(&leaf.cert))
                .collect::<Result<Vec<_>, _>>()
                .expect("leaf PEM");
            let key = PrivateKeyDer::from_pem_slice(&pem(&leaf.key)).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").expect("an IP is a server name");
    let mut tls = connector.connect(name, tcp).await?;
    let server_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    // The HTTP/2 connection preface and an empty SETTINGS frame; the server answers with its own.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await?;
    tls.flush().await?;
    let mut buf = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the server closed the connection",
        )),
        Ok(Ok(_)) => Ok(server_cert),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer in 10 s",
        )),
    }
}

/// The TLS alert the server sent, if that is what `err` is.
pub fn alert(err: &std::io::Error) -> Option<rustls::AlertDescription> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}
