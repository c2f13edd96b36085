//! TLS on every hop, with rustls (ring is the one crypto provider in the tree).
//!
//! Every role takes `--tls-cert`, `--tls-key` and `--tls-ca` (or, explicitly, `--plaintext`) and
//! uses the same files on both sides of its hops: they are its server certificate, its client
//! certificate when it dials a peer (frontend → gate, gate → expert worker, and an `https://`
//! etcd), and the CA bundle that peers are verified against. The gate and the expert workers
//! require a client certificate signed by that CA (mutual TLS); the frontend's public port accepts
//! clients without one, but verifies any that is presented.
//!
//! Certificates carry their holder's role as a URI SAN, `spiffe://moemesh/role/<role>` (see
//! [`CertRole`]); the gate answers `Gate.Step` only to a peer whose certificate has the frontend
//! role, and an expert worker answers `Expert.Forward` only to the gate role
//! ([`RequireRoleLayer`]), so a client certificate issued for the public port (role `client`)
//! opens no internal call.
//! Health and reflection stay open to any certificate of the CA, for probes.
//!
//! The files are polled ([`crate::reload`]) and, when they change and parse, swapped in: a new
//! connection (accepted or dialed) uses the new certificate, key and CA; a connection that is
//! already open keeps the session it negotiated. Files that do not parse (say, a key written
//! before its certificate) are reported and the previous ones stay in force.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Args;
use futures::stream::BoxStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::{MeshError, MeshResult, reload};

/// How long an accepted connection may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport flags every role shares.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This process's certificate chain (PEM): its server certificate, and its client certificate
    /// towards the peers it dials. It needs the serverAuth and clientAuth extended key usages (or
    /// none) and the names or IPs peers dial it by. Reloaded when the file changes.
    #[arg(long, env = "MOEMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1). Reloaded when it changes.
    #[arg(long, env = "MOEMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that peers' certificates are verified against: the servers this process
    /// dials, and its clients (required on the gate and expert workers: mutual TLS; optional on
    /// the frontend's public port). Reloaded when it changes.
    #[arg(long, env = "MOEMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Name to verify the certificates of dialed peers against, instead of the host in their
    /// address (for meshes whose certificates name a service rather than each pod's IP).
    #[arg(long, env = "MOEMESH_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Run without TLS, explicitly: nothing is encrypted or authenticated. Without this flag a
    /// role refuses to start unless given --tls-cert, --tls-key and --tls-ca.
    #[arg(long, env = "MOEMESH_PLAINTEXT")]
    pub plaintext: bool,
}

/// Whether a TLS server port demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Mutual TLS: a client without a certificate signed by the CA is refused (gate, expert).
    Required,
    /// Clients may come without a certificate; one that is presented must verify (frontend).
    Optional,
}

impl TlsArgs {
    /// Checks that the flags make one clear choice, before any port is bound.
    pub fn check(&self) -> MeshResult<()> {
        let given = self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some();
        if self.plaintext && given {
            return Err(MeshError::Invalid(
                "--plaintext conflicts with --tls-cert/--tls-key/--tls-ca: choose TLS or plaintext"
                    .into(),
            ));
        }
        if self.plaintext {
            return Ok(());
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(_), Some(_), Some(_)) => Ok(()),
            (None, None, None) => Err(MeshError::Invalid(
                "no transport security chosen: give --tls-cert, --tls-key and --tls-ca (TLS; mutual \
                 between mesh services), or --plaintext to run without TLS"
                    .into(),
            )),
            _ => Err(MeshError::Invalid(
                "TLS needs all of --tls-cert, --tls-key and --tls-ca (the CA verifies the peers \
                 this process dials and its clients)"
                    .into(),
            )),
        }
    }

    /// Loads the TLS files and starts watching them; `None` with --plaintext.
    pub fn load(&self, client_auth: ClientAuth) -> MeshResult<Option<Arc<Tls>>> {
        self.check()?;
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(None);
        };
        let paths = vec![cert.clone(), key.clone(), ca.clone()];
        let contents = reload::read_all(&paths).map_err(|e| {
            MeshError::Invalid(format!(
                "reading the TLS files (--tls-cert {}, --tls-key {}, --tls-ca {}): {e}",
                cert.display(),
                key.display(),
                ca.display()
            ))
        })?;
        let names = FileNames {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        };
        let material = Material::parse(&names, &contents, client_auth)?;
        let tls = Arc::new(Tls {
            names,
            client_auth,
            server_name: self.tls_server_name.clone(),
            current: ArcSwap::from_pointee(material),
        });
        reload::spawn_watch(
            Arc::downgrade(&tls),
            paths,
            contents,
            |tls: &Tls, new: &[Vec<u8>]| match Material::parse(&tls.names, new, tls.client_auth) {
                Ok(m) => {
                    tls.current.store(Arc::new(m));
                    tracing::info!(cert = %tls.names.cert.display(), "TLS files changed: new connections use them");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones")
                }
            },
        );
        Ok(Some(tls))
    }
}

#[derive(Debug)]
struct FileNames {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// One consistent set of loaded files.
#[derive(Debug)]
struct Material {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    server: Arc<ServerConfig>,
}

fn invalid(flag: &str, path: &Path, what: impl std::fmt::Display) -> MeshError {
    MeshError::Invalid(format!("{flag} {}: {what}", path.display()))
}

fn certificates(pem: &[u8], flag: &str, path: &Path) -> MeshResult<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(flag, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(flag, path, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

impl Material {
    /// Parses `[cert, key, ca]` PEM contents and builds the server side from them.
    fn parse(names: &FileNames, contents: &[Vec<u8>], client_auth: ClientAuth) -> MeshResult<Self> {
        let [cert_pem, key_pem, ca_pem] = contents else {
            return Err(MeshError::Internal(
                "TLS material needs 3 files".to_string(),
            ));
        };
        let certs = certificates(cert_pem, "--tls-cert", &names.cert)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            invalid(
                "--tls-key",
                &names.key,
                format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
            )
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certificates(ca_pem, "--tls-ca", &names.ca)? {
            roots
                .add(ca)
                .map_err(|e| invalid("--tls-ca", &names.ca, e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let verifier = match client_auth {
            ClientAuth::Required => verifier,
            ClientAuth::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| invalid("--tls-ca", &names.ca, e))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| MeshError::Internal(format!("TLS protocol versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| {
                MeshError::Invalid(format!(
                    "--tls-cert {} with --tls-key {}: {e}",
                    names.cert.display(),
                    names.key.display()
                ))
            })?;
        // gRPC is HTTP/2; clients (tonic's among them) insist on negotiating it.
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Material {
            cert_pem: cert_pem.clone(),
            key_pem: key_pem.clone(),
            ca_pem: ca_pem.clone(),
            server: Arc::new(server),
        })
    }
}

/// A role's loaded TLS files, kept current by a watch task.
#[derive(Debug)]
pub struct Tls {
    names: FileNames,
    client_auth: ClientAuth,
    /// `--tls-server-name`: the name dialed peers' certificates must carry, if not their host.
    server_name: Option<String>,
    current: ArcSwap<Material>,
}

impl Tls {
    /// The client side as it stands now: this process's certificate as its identity, peers
    /// verified against the CA. Taken per connection, so new connections see reloaded files.
    pub fn client_config(&self) -> ClientTlsConfig {
        let m = self.current.load();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&m.ca_pem))
            .identity(Identity::from_pem(&m.cert_pem, &m.key_pem))
    }

    /// An endpoint for the mesh peer at `address` (`host:port`) over mutual TLS.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, tonic::transport::Error> {
        let mut config = self.client_config();
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Endpoint::from_shared(format!("https://{address}"))?.tls_config(config)
    }
}

/// Installs ring as the process's rustls provider, for code that asks rustls for the default
/// (tonic's client side does); our own configs name it directly. Idempotent.
pub fn install_crypto_provider() {
    // An error means a provider is installed already: the same one, since ring is the only one
    // compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An endpoint for a mesh peer at `address`: mutual TLS when `tls` is given, else plaintext.
pub fn endpoint(address: &str, tls: Option<&Tls>) -> Result<Endpoint, tonic::transport::Error> {
    match tls {
        Some(t) => t.endpoint(address),
        None => Endpoint::from_shared(format!("http://{address}")),
    }
}

/// A mesh role as a certificate states it: a URI SAN `spiffe://moemesh/role/<name>` (a
/// certificate shared by several roles carries one SAN for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    /// May call `Gate.Step`.
    Frontend,
    /// May call `Expert.Forward`.
    Gate,
    /// An expert worker (calls no internal method; named so its certificate says what it is).
    Expert,
    /// A client of the public port: no internal calls.
    Client,
}

impl CertRole {
    pub const ALL: [CertRole; 4] = [
        CertRole::Frontend,
        CertRole::Gate,
        CertRole::Expert,
        CertRole::Client,
    ];
    /// What comes before the role's name in its URI SAN.
    pub const URI_PREFIX: &'static str = "spiffe://moemesh/role/";

    pub fn name(self) -> &'static str {
        match self {
            CertRole::Frontend => "frontend",
            CertRole::Gate => "gate",
            CertRole::Expert => "expert",
            CertRole::Client => "client",
        }
    }

    /// The URI SAN that gives a certificate this role.
    pub fn uri(self) -> String {
        format!("{}{}", Self::URI_PREFIX, self.name())
    }

    /// The roles a certificate (DER) carries; none for one that does not parse or has no role
    /// SAN.
    pub fn of_certificate(der: &[u8]) -> Vec<CertRole> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Vec::new();
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return Vec::new();
        };
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => uri.strip_prefix(Self::URI_PREFIX),
                _ => None,
            })
            .filter_map(|name| Self::ALL.into_iter().find(|r| r.name() == name))
            .collect()
    }
}

/// What a server knows of a connection's peer; tonic puts it in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The TCP addresses.
    pub tcp: TcpConnectInfo,
    /// The roles in the peer's certificate: `None` on a plaintext connection, empty under TLS
    /// when the peer presented no certificate or one without a role.
    pub roles: Option<Vec<CertRole>>,
}

/// Answers calls of the method at `path` with PERMISSION_DENIED unless the peer's certificate
/// carries `role` (on a TLS connection; a plaintext mesh has no identities to check).
#[derive(Clone, Copy)]
pub struct RequireRoleLayer {
    path: &'static str,
    role: CertRole,
}

impl RequireRoleLayer {
    pub fn new(path: &'static str, role: CertRole) -> Self {
        RequireRoleLayer { path, role }
    }

    /// Why a peer with `info` may not make this call, if it may not.
    fn refusal(&self, info: Option<&PeerInfo>) -> Option<String> {
        let roles = info?.roles.as_ref()?;
        if roles.contains(&self.role) {
            return None;
        }
        let held: Vec<&str> = roles.iter().map(|r| r.name()).collect();
        Some(format!(
            "{} needs a client certificate with the {} role (URI SAN {}); this peer's \
             certificate carries {}",
            self.path.trim_start_matches("/moemesh.v1."),
            self.role.name(),
            self.role.uri(),
            if held.is_empty() {
                "no role".to_string()
            } else {
                format!("the role(s) {}", held.join(", "))
            }
        ))
    }
}

impl<S> tower::Layer<S> for RequireRoleLayer {
    type Service = RequireRole<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireRole {
            inner,
            layer: *self,
        }
    }
}

#[derive(Clone)]
pub struct RequireRole<S> {
    inner: S,
    layer: RequireRoleLayer,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RequireRole<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = crate::layers::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if req.uri().path() == self.layer.path
            && let Some(why) = self.layer.refusal(req.extensions().get::<PeerInfo>())
        {
            tracing::info!(method = self.layer.path, "{why}");
            // The inner service was readied for this call and is not called: it stays ready.
            let resp = tonic::Status::from(MeshError::PermissionDenied(why)).into_http::<ResBody>();
            return Box::pin(async move { Ok(resp) });
        }
        Box::pin(self.inner.call(req))
    }
}

/// The first byte of a TLS handshake record (RFC 8446 §5.1: content type 22), which a TLS
/// client's first message starts with.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a plaintext gRPC client on a TLS port is told.
pub const PLAINTEXT_ON_TLS: &str = "this port requires TLS and the client connected in plaintext: connect with TLS (for moemesh clients, --tls-ca CA.pem; grpcurl without -plaintext), or run the server with --plaintext";

/// Answers a plaintext client on a TLS port: an HTTP/2 one (its first byte is the preface's
/// `P`) gets UNAVAILABLE saying so on every call, for as long as a handshake may take; any
/// other is closed.
async fn refuse_plaintext(tcp: TcpStream, first: u8) {
    if first != b'P' {
        return;
    }
    let service = hyper::service::service_fn(|_req| async {
        let status = tonic::Status::unavailable(PLAINTEXT_ON_TLS);
        Ok::<_, std::convert::Infallible>(status.into_http::<tonic::body::Body>())
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn).await;
}

/// Logs a TLS ClientHello arriving on a plaintext port (`first` is what the connection sent
/// first): the server would answer it with HTTP/2 and the client would fail with a confusing
/// handshake error, so the server's log says what is wrong.
fn tls_on_plaintext(tcp: &TcpStream, first: &[u8]) {
    if first.first() == Some(&TLS_HANDSHAKE_RECORD) {
        let peer = tcp
            .peer_addr()
            .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
        tracing::warn!(
            %peer,
            "a client started a TLS handshake on this plaintext port: the client should connect without TLS (for moemesh clients, no --tls-ca), or this server should run with TLS files"
        );
    }
}

/// A connection accepted by a role's server: plain TCP, or TCP after a TLS handshake.
pub enum ServerIo {
    /// Plain TCP, and whether its first bytes have been looked at ([`tls_on_plaintext`]).
    Plain(TcpStream, bool),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for ServerIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            ServerIo::Plain(s, _) => PeerInfo {
                tcp: s.connect_info(),
                roles: None,
            },
            ServerIo::Tls(s) => {
                let (tcp, session) = s.get_ref();
                let cert = session.peer_certificates().and_then(|c| c.first());
                PeerInfo {
                    tcp: tcp.connect_info(),
                    roles: Some(cert.map_or_else(Vec::new, |c| CertRole::of_certificate(c))),
                }
            }
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s, sniffed) => {
                let before = buf.filled().len();
                let read = Pin::new(&mut *s).poll_read(cx, buf);
                if !*sniffed && buf.filled().len() > before {
                    *sniffed = true;
                    tls_on_plaintext(s, &buf.filled()[before..]);
                }
                read
            }
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s, _) => s.is_write_vectored(),
            ServerIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections a role serves: `listener`'s, with TCP_NODELAY (see [`crate::serve::incoming`]),
/// after a TLS handshake when `tls` is given. Handshakes run on their own tasks, so a slow or
/// silent client holds up no one else; one that fails (a certificate the CA did not sign, none
/// where one is required) is logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
) -> BoxStream<'static, std::io::Result<ServerIo>> {
    use futures::StreamExt;
    let Some(tls) = tls else {
        return crate::serve::incoming(listener)
            .map(|conn| conn.map(|c| ServerIo::Plain(c, false)))
            .boxed();
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // The server stopped listening.
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: only time helps, so don't spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "TCP_NODELAY");
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current.load().server.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                // A client that speaks plaintext here would get a TLS alert, which its HTTP/2
                // stack reads as a frame of a wrong size (FRAME_SIZE_ERROR): say what it is.
                let mut first = [0u8; 1];
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                    Ok(Ok(1..)) => {}
                    Ok(Ok(0)) => return,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "connection failed before its TLS handshake");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        return;
                    }
                }
                if first[0] != TLS_HANDSHAKE_RECORD {
                    tracing::warn!(
                        %peer,
                        "a client spoke plaintext (not a TLS handshake) to this TLS port: the client needs TLS (for moemesh clients, --tls-ca), or this server --plaintext"
                    );
                    refuse_plaintext(tcp, first[0]).await;
                    return;
                }
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(ServerIo::Tls(Box::new(conn)))).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>, plain: bool) -> TlsArgs {
        TlsArgs {
            tls_cert: cert.map(Path::to_path_buf),
            tls_key: key.map(Path::to_path_buf),
            tls_ca: ca.map(Path::to_path_buf),
            tls_server_name: None,
            plaintext: plain,
        }
    }

    fn message(r: MeshResult<()>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn the_transport_must_be_chosen_once() {
        let p = Path::new("x.pem");
        let none = message(args(None, None, None, false).check());
        for flag in ["--tls-cert", "--tls-key", "--tls-ca", "--plaintext"] {
            assert!(none.contains(flag), "{none}");
        }
        assert!(message(args(None, None, Some(p), true).check()).contains("conflicts"));
        assert!(message(args(Some(p), Some(p), None, false).check()).contains("all of"));
        assert!(args(None, None, None, true).check().is_ok());
        assert!(args(Some(p), Some(p), Some(p), false).check().is_ok());
    }

    /// A CA and two leaves it signed, as PEM files in `dir`.
    fn pki(dir: &Path) -> [PathBuf; 5] {
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let path = |name: &str| dir.join(name);
        std::fs::write(path("ca.pem"), ca_cert.pem()).expect("write");
        for leaf in ["a", "b"] {
            let params =
                rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("names");
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &issuer).expect("leaf");
            std::fs::write(path(&format!("{leaf}.pem")), cert.pem()).expect("write");
            std::fs::write(path(&format!("{leaf}-key.pem")), key.serialize_pem()).expect("write");
        }
        ["ca.pem", "a.pem", "a-key.pem", "b.pem", "b-key.pem"].map(path)
    }

    /// A self-signed certificate (DER) with `uris` as URI SANs.
    fn with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("names");
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(uri.to_string()).expect("ASCII"),
            ));
        }
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn roles_come_from_uri_sans_and_only_the_required_one_passes() {
        let frontend = with_uris(&["spiffe://moemesh/role/frontend"]);
        let shared = with_uris(&[
            "spiffe://moemesh/role/gate",
            "https://example.com/x",
            "spiffe://moemesh/role/expert",
        ]);
        let client = with_uris(&["spiffe://moemesh/role/client"]);
        let foreign = with_uris(&["spiffe://moemesh/role/root", "spiffe://other/role/gate"]);
        assert_eq!(CertRole::of_certificate(&frontend), [CertRole::Frontend]);
        assert_eq!(
            CertRole::of_certificate(&shared),
            [CertRole::Gate, CertRole::Expert]
        );
        assert_eq!(CertRole::of_certificate(&client), [CertRole::Client]);
        assert!(CertRole::of_certificate(&foreign).is_empty());
        assert!(CertRole::of_certificate(b"not DER").is_empty());

        let step = RequireRoleLayer::new("/moemesh.v1.Gate/Step", CertRole::Frontend);
        let peer = |der: Option<&[u8]>| PeerInfo {
            tcp: TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
            roles: der.map(CertRole::of_certificate),
        };
        assert_eq!(step.refusal(Some(&peer(Some(&frontend[..])))), None);
        // Plaintext: no identities to check.
        assert_eq!(step.refusal(Some(&peer(None))), None);
        let why = step
            .refusal(Some(&peer(Some(&client[..]))))
            .expect("refused");
        assert!(
            why.contains("Gate/Step")
                && why.contains("frontend role")
                && why.contains("spiffe://moemesh/role/frontend")
                && why.contains("client"),
            "{why}"
        );
        let why = step
            .refusal(Some(&peer(Some(&foreign[..]))))
            .expect("refused");
        assert!(why.contains("no role"), "{why}");
    }

    #[tokio::test]
    async fn files_that_do_not_fit_are_refused_with_their_flag_and_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let [ca, a, a_key, _b, b_key] = pki(dir.path());
        let load = |cert: &Path, key: &Path, ca: &Path| {
            args(Some(cert), Some(key), Some(ca), false)
                .load(ClientAuth::Required)
                .map(|_| ())
        };
        assert!(load(&a, &a_key, &ca).is_ok());
        let mismatch = message(load(&a, &b_key, &ca));
        assert!(
            mismatch.contains("--tls-cert") && mismatch.contains("b-key.pem"),
            "{mismatch}"
        );
        let not_a_key = message(load(&a, &a, &ca));
        assert!(
            not_a_key.contains("--tls-key") && not_a_key.contains("a.pem"),
            "{not_a_key}"
        );
        let not_a_ca = message(load(&a, &a_key, &a_key));
        assert!(
            not_a_ca.contains("--tls-ca") && not_a_ca.contains("no PEM CERTIFICATE"),
            "{not_a_ca}"
        );
        let missing = message(load(&a, &a_key, &dir.path().join("nope.pem")));
        assert!(missing.contains("nope.pem"), "{missing}");
    }
}
