//! How the client subcommands (`generate --addr`, `bench`, `health`) reach a role: TLS when `--tls-ca`
//! is given (presenting a client certificate when `--tls-cert`/`--tls-key` are), and an API key
//! sent as `authorization: Bearer <key>`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use moemesh_proto::v1::generation_client::GenerationClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// Talk TLS to the frontend and verify its certificate against this CA bundle (PEM);
    /// plaintext without it.
    #[arg(long, env = "MOEMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present over TLS, with --tls-key.
    #[arg(long, env = "MOEMESH_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "MOEMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name the frontend's certificate must carry, if not the host in --addr.
    #[arg(long, env = "MOEMESH_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// API key, sent as `authorization: Bearer <key>` (the frontend's --api-keys-file).
    #[arg(long, env = "MOEMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = GenerationClient<InterceptedService<Channel, Bearer>>;

fn read(path: &PathBuf, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

impl ClientArgs {
    /// Connects to the frontend at `addr` (`host:port`).
    pub async fn connect(&self, addr: &str) -> anyhow::Result<Client> {
        let channel = self.channel(addr).await?;
        let bearer = self
            .api_key
            .as_ref()
            .map(|k| format!("Bearer {k}").parse::<MetadataValue<Ascii>>())
            .transpose()
            .context("--api-key: not a valid header value (printable ASCII only)")?;
        Ok(GenerationClient::with_interceptor(channel, Bearer(bearer)))
    }

    /// A channel to any role at `addr` (`host:port`), over TLS when --tls-ca is given.
    pub async fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        let endpoint = match &self.tls_ca {
            None => Endpoint::from_shared(format!("http://{addr}"))?,
            Some(ca) => {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca, "--tls-ca")?));
                if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                    tls = tls.identity(Identity::from_pem(
                        read(cert, "--tls-cert")?,
                        read(key, "--tls-key")?,
                    ));
                }
                if let Some(name) = &self.tls_server_name {
                    tls = tls.domain_name(name.clone());
                }
                Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?
            }
        };
        endpoint.connect().await.map_err(|e| {
            // rustls's words for a server that answered a ClientHello in plaintext (HTTP/2).
            let plaintext_server = format!("{e:?}").contains("InvalidContentType");
            if self.tls_ca.is_some() && plaintext_server {
                anyhow::Error::new(e).context(format!(
                    "connecting to {addr} with TLS (--tls-ca): the server answered in plaintext, so it \
                     runs without TLS (--plaintext); connect without --tls-ca, or give the server TLS files"
                ))
            } else {
                anyhow::Error::new(e).context(format!("connecting to {addr}"))
            }
        })
    }
}
