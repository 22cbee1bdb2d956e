//! Where and how to reach PostgreSQL: one URL, used for both the SQL connection
//! (`tokio-postgres`) and the replication connection (`pgwire-replication`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use pgwire_replication::{SslMode as WireSslMode, TlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::secret::Secret;

/// `sslmode`, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, without verifying the certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the host name must match the certificate.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "unknown sslmode `{other}` (expected disable, prefer, require, verify-ca or verify-full)"
                ));
            }
        })
    }
}

/// A parsed `postgres://user:password@host:port/dbname?sslmode=…` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    /// A host name or address, or a directory holding the Unix socket when it starts with `/`.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid database URL `{redacted}`: {reason}")]
pub struct DatabaseUrlError {
    redacted: String,
    reason: String,
}

impl FromStr for DatabaseUrl {
    type Err = DatabaseUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| DatabaseUrlError {
            redacted: redact_url(text),
            reason,
        };
        // `postgres://user@/db?host=/socket/dir` is valid for libpq; the url crate wants a host.
        let normalized = text.replacen("@/", "@localhost/", 1);
        let url = url::Url::parse(&normalized).map_err(|e| err(e.to_string()))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(err(format!(
                "the scheme must be postgres:// or postgresql://, not {}://",
                url.scheme()
            )));
        }
        let decode = |s: &str| {
            percent_decode(s).map_err(|_| err("percent-encoding is not valid UTF-8".into()))
        };
        let mut parsed = DatabaseUrl {
            host: match url.host_str() {
                Some(h) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                None => String::new(),
            },
            port: url.port().unwrap_or(5432),
            user: decode(url.username())?,
            password: url.password().map(decode).transpose()?.map(Secret::new),
            dbname: decode(url.path().trim_start_matches('/'))?,
            sslmode: SslMode::default(),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            application_name: "outbox-cdc".into(),
        };
        for (key, value) in url.query_pairs() {
            let value = value.into_owned();
            match key.as_ref() {
                "sslmode" => parsed.sslmode = value.parse().map_err(err)?,
                "sslrootcert" => parsed.sslrootcert = Some(value.into()),
                "sslcert" => parsed.sslcert = Some(value.into()),
                "sslkey" => parsed.sslkey = Some(value.into()),
                "host" => parsed.host = value,
                "port" => {
                    parsed.port = value
                        .parse()
                        .map_err(|_| err(format!("port `{value}` is not a number")))?
                }
                "user" => parsed.user = value,
                "password" => parsed.password = Some(Secret::new(value)),
                "dbname" => parsed.dbname = value,
                "application_name" => parsed.application_name = value,
                // Accepted for compatibility with libpq URLs; they do not change behaviour here.
                "connect_timeout" | "target_session_attrs" | "channel_binding" => {}
                other => return Err(err(format!("unsupported parameter `{other}`"))),
            }
        }
        if parsed.host.is_empty() {
            parsed.host = "localhost".into();
        }
        if parsed.user.is_empty() {
            return Err(err("no user name (postgres://USER@host/db)".into()));
        }
        if parsed.dbname.is_empty() {
            parsed.dbname = parsed.user.clone();
        }
        if parsed.host.starts_with('/') && parsed.sslmode != SslMode::Disable {
            // TLS does not apply to Unix sockets; libpq ignores sslmode there too.
            parsed.sslmode = SslMode::Disable;
        }
        Ok(parsed)
    }
}

fn percent_decode(s: &str) -> Result<String, std::str::Utf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    std::str::from_utf8(&out).map(str::to_owned)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" {
                        "***".into()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "<unparseable URL>".into(),
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = if self.password.is_some() { ":***" } else { "" };
        if self.host.starts_with('/') {
            write!(
                f,
                "postgres://{}{password}@/{}?host={}&port={}",
                self.user, self.dbname, self.host, self.port
            )
        } else {
            write!(
                f,
                "postgres://{}{password}@{}:{}/{}",
                self.user, self.host, self.port, self.dbname
            )
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("TLS setup for PostgreSQL failed: {0}")]
pub struct TlsSetupError(String);

impl DatabaseUrl {
    /// Settings for the ordinary SQL connection, with its TLS connector.
    pub fn sql_config(
        &self,
    ) -> Result<
        (
            tokio_postgres::Config,
            tokio_postgres_rustls::MakeRustlsConnect,
        ),
        TlsSetupError,
    > {
        let mut config = tokio_postgres::Config::new();
        if self.host.starts_with('/') {
            config.host_path(&self.host);
        } else {
            config.host(&self.host);
        }
        config
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .connect_timeout(std::time::Duration::from_secs(10))
            // A peer that vanished without FIN or RST: the kernel gives up on the connection
            // within about half a minute instead of retransmitting for a quarter of an hour.
            .keepalives_idle(std::time::Duration::from_secs(15))
            .keepalives_interval(std::time::Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(std::time::Duration::from_secs(30))
            .ssl_mode(match self.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
        Ok((config, tls))
    }

    fn rustls_config(&self) -> Result<ClientConfig, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError(e.to_string()))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.sslmode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                Arc::new(AcceptAnyCertificate(provider))
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let mut roots = RootCertStore::empty();
                match &self.sslrootcert {
                    Some(path) => {
                        let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                            TlsSetupError(format!("reading sslrootcert {}: {e}", path.display()))
                        })?;
                        for cert in certs {
                            let cert = cert.map_err(|e| {
                                TlsSetupError(format!(
                                    "reading sslrootcert {}: {e}",
                                    path.display()
                                ))
                            })?;
                            roots.add(cert).map_err(|e| {
                                TlsSetupError(format!("sslrootcert {}: {e}", path.display()))
                            })?;
                        }
                    }
                    None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                }
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| TlsSetupError(e.to_string()))?;
                if self.sslmode == SslMode::VerifyCa {
                    Arc::new(IgnoreHostName(inner))
                } else {
                    inner
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match (&self.sslcert, &self.sslkey) {
            (Some(cert), Some(key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        TlsSetupError(format!("reading sslcert {}: {e}", cert.display()))
                    })?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| TlsSetupError(format!("reading sslkey {}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| TlsSetupError(e.to_string()))
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err(TlsSetupError(
                "sslcert and sslkey must be given together".into(),
            )),
        }
    }

    /// TLS settings for the replication connection.
    pub fn replication_tls(&self) -> TlsConfig {
        let mode = match self.sslmode {
            SslMode::Disable => WireSslMode::Disable,
            SslMode::Prefer => WireSslMode::Prefer,
            SslMode::Require => WireSslMode::Require,
            SslMode::VerifyCa => WireSslMode::VerifyCa,
            SslMode::VerifyFull => WireSslMode::VerifyFull,
        };
        TlsConfig {
            mode,
            ca_pem_path: self.sslrootcert.clone(),
            // An IP address as the name to verify: libpq's verify-full matches it against the
            // certificate's IP SANs, and so does rustls, but pgwire-replication refuses an IP
            // host unless it is given explicitly.
            sni_hostname: (self.sslmode == SslMode::VerifyFull
                && self.host.parse::<std::net::IpAddr>().is_ok())
            .then(|| self.host.clone()),
            client_cert_pem_path: self.sslcert.clone(),
            client_key_pem_path: self.sslkey.clone(),
        }
    }
}

/// `sslmode=require`: encrypt, but (like libpq) do not verify who answers.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must verify, the host name need not match.
#[derive(Debug)]
struct IgnoreHostName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let url: DatabaseUrl =
            "postgres://app%40x:p%3Ass@db.example:6543/orders?sslmode=verify-full&sslrootcert=/ca.pem"
                .parse()
                .unwrap();
        assert_eq!(url.host, "db.example");
        assert_eq!(url.port, 6543);
        assert_eq!(url.user, "app@x");
        assert_eq!(url.password.as_ref().unwrap().expose(), "p:ss");
        assert_eq!(url.dbname, "orders");
        assert_eq!(url.sslmode, SslMode::VerifyFull);
        assert_eq!(
            url.sslrootcert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(
            url.to_string(),
            "postgres://app@x:***@db.example:6543/orders"
        );
        assert!(!format!("{url:?}").contains("p:ss"));
    }

    #[test]
    fn applies_defaults_and_socket_hosts() {
        let url: DatabaseUrl = "postgresql://postgres@/app?host=/tmp/pg&port=5499"
            .parse()
            .unwrap();
        assert_eq!(url.host, "/tmp/pg");
        assert_eq!(url.port, 5499);
        assert_eq!(url.sslmode, SslMode::Disable, "no TLS over Unix sockets");
        let url: DatabaseUrl = "postgres://me@localhost".parse().unwrap();
        assert_eq!(url.port, 5432);
        assert_eq!(url.dbname, "me");
        assert_eq!(url.sslmode, SslMode::Prefer);
    }

    #[test]
    fn rejects_bad_urls_without_leaking_the_password() {
        for (bad, why) in [
            ("mysql://u:secret@h/db", "scheme"),
            (
                "postgres://u:secret@h/db?sslmode=sometimes",
                "unknown sslmode",
            ),
            (
                "postgres://u:secret@h/db?frobnicate=1",
                "unsupported parameter",
            ),
            ("postgres://:secret@h/db", "no user"),
            ("not a url", "relative URL"),
        ] {
            let err = bad.parse::<DatabaseUrl>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
    }

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:1/d?password=x&sslmode=require"),
            "postgres://u:***@h:1/d?password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
    }

    #[test]
    fn builds_tls_configs_for_every_mode() {
        for mode in ["disable", "prefer", "require"] {
            let url: DatabaseUrl = format!("postgres://u@h/d?sslmode={mode}").parse().unwrap();
            assert!(url.sql_config().is_ok(), "{mode}");
        }
        let url: DatabaseUrl = "postgres://u@h/d?sslmode=verify-ca&sslrootcert=/does/not/exist.pem"
            .parse()
            .unwrap();
        let err = url.sql_config().err().expect("missing CA file").to_string();
        assert!(err.contains("/does/not/exist.pem"), "{err}");
        assert_eq!(url.replication_tls().mode, WireSslMode::VerifyCa);
    }
}
