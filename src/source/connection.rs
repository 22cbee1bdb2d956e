//! Where and how to reach PostgreSQL: one connection string, used for both the SQL connection
//! (`tokio-postgres`) and the replication connection (`pgwire-replication`).
//!
//! Both libpq forms are accepted: a URL (`postgresql://user@a:5432,b:5432/app?sslmode=require`,
//! hosts also as `?host=a,b&port=5432,5433`) and key/value pairs (`host=a,b port=5432
//! dbname=app`). With several hosts, the first that is a primary is used, as libpq does with
//! `target_session_attrs=read-write`: after a failover outbox-cdc finds the new primary itself.

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

/// Which of the hosts to use (`target_session_attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSession {
    /// The first host that is not in recovery (`read-write`, `primary`, or not set): the slot
    /// lives on the primary, and only the primary's WAL is the history outbox-cdc publishes.
    #[default]
    Primary,
    /// The first host that answers (`any`), standby or not.
    Any,
}

impl FromStr for TargetSession {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read-write" | "primary" => Ok(TargetSession::Primary),
            "any" => Ok(TargetSession::Any),
            other => Err(format!(
                "target_session_attrs `{other}` is not supported: outbox-cdc reads the primary's \
                 WAL (use read-write, primary or any)"
            )),
        }
    }
}

/// One host to try: a name or address, or a directory holding the Unix socket when it starts
/// with `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub port: u16,
}

impl Host {
    pub fn is_socket(&self) -> bool {
        self.name.starts_with('/')
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.contains(':') {
            write!(f, "[{}]:{}", self.name, self.port)
        } else {
            write!(f, "{}:{}", self.name, self.port)
        }
    }
}

/// A parsed PostgreSQL connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    /// Tried in order; never empty.
    pub hosts: Vec<Host>,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: String,
    pub target_session: TargetSession,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid database URL `{redacted}`: {reason}")]
pub struct DatabaseUrlError {
    redacted: String,
    reason: String,
}

/// The settings before they are checked: what both forms of the string give.
#[derive(Default)]
struct Settings {
    hosts: Vec<String>,
    ports: Vec<String>,
    user: String,
    password: Option<String>,
    dbname: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    application_name: Option<String>,
    target_session_attrs: Option<String>,
}

impl Settings {
    /// A `key=value` setting, as in libpq's key/value form and a URL's query string.
    fn set(&mut self, key: &str, value: String) -> Result<(), String> {
        let list = |value: &str| value.split(',').map(|v| v.trim().to_owned()).collect();
        match key {
            "host" | "hostaddr" => self.hosts = list(&value),
            "port" => self.ports = list(&value),
            "user" => self.user = value,
            "password" => self.password = Some(value),
            "dbname" => self.dbname = value,
            "sslmode" => self.sslmode = Some(value),
            "sslrootcert" => self.sslrootcert = Some(value),
            "sslcert" => self.sslcert = Some(value),
            "sslkey" => self.sslkey = Some(value),
            "application_name" => self.application_name = Some(value),
            "target_session_attrs" => self.target_session_attrs = Some(value),
            // Accepted for compatibility with libpq; they do not change behaviour here.
            "connect_timeout" | "channel_binding" | "load_balance_hosts" => {}
            other => return Err(format!("unsupported parameter `{other}`")),
        }
        Ok(())
    }

    fn check(self) -> Result<DatabaseUrl, String> {
        let names = if self.hosts.iter().all(String::is_empty) {
            vec!["localhost".to_owned()]
        } else {
            self.hosts
        };
        let ports: Vec<u16> = self
            .ports
            .iter()
            .map(|p| match p.as_str() {
                "" => Ok(5432),
                p => p.parse().map_err(|_| format!("port `{p}` is not a number")),
            })
            .collect::<Result<_, _>>()?;
        let host_count = names.len();
        let port_of = |i: usize| match ports.len() {
            0 => Ok(5432),
            1 => Ok(ports[0]),
            n if n == host_count => Ok(ports[i]),
            n => Err(format!(
                "{n} ports for {host_count} hosts: give one port, or one per host"
            )),
        };
        let hosts = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let name = if name.is_empty() {
                    "localhost".to_owned()
                } else {
                    name
                };
                Ok(Host {
                    name,
                    port: port_of(i)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if self.user.is_empty() {
            return Err("no user name (postgres://USER@host/db, or user=USER)".into());
        }
        let mut sslmode = match &self.sslmode {
            Some(mode) => mode.parse()?,
            None => SslMode::default(),
        };
        if hosts.iter().all(Host::is_socket) {
            // TLS does not apply to Unix sockets; libpq ignores sslmode there too.
            sslmode = SslMode::Disable;
        }
        Ok(DatabaseUrl {
            hosts,
            dbname: if self.dbname.is_empty() {
                self.user.clone()
            } else {
                self.dbname
            },
            user: self.user,
            password: self.password.map(Secret::new),
            sslmode,
            sslrootcert: self.sslrootcert.map(PathBuf::from),
            sslcert: self.sslcert.map(PathBuf::from),
            sslkey: self.sslkey.map(PathBuf::from),
            application_name: self
                .application_name
                .unwrap_or_else(|| "outbox-cdc".to_owned()),
            target_session: match &self.target_session_attrs {
                Some(attrs) => attrs.parse()?,
                None => TargetSession::default(),
            },
        })
    }
}

impl FromStr for DatabaseUrl {
    type Err = DatabaseUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| DatabaseUrlError {
            redacted: redact_url(text),
            reason,
        };
        let settings = match text.split_once("://") {
            Some((scheme, rest)) => {
                if !matches!(scheme, "postgres" | "postgresql") {
                    return Err(err(format!(
                        "the scheme must be postgres:// or postgresql://, not {scheme}://"
                    )));
                }
                parse_url(rest).map_err(err)?
            }
            None if text.contains('=') => parse_key_values(text).map_err(err)?,
            None => {
                return Err(err(
                    "expected a URL (postgres://user@host/db) or key/value pairs \
                     (host=… user=… dbname=…)"
                        .into(),
                ));
            }
        };
        settings.check().map_err(err)
    }
}

/// The part of a URL after `postgres://`: `[user[:password]@][host[:port][,…]][/dbname][?k=v&…]`.
fn parse_url(rest: &str) -> Result<Settings, String> {
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let mut settings = Settings::default();
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        settings.user = percent_decode(user)?;
        settings.password = password.map(percent_decode).transpose()?;
    }
    for host in hostlist.split(',').filter(|h| !h.is_empty()) {
        let (name, port) = split_host_port(host)?;
        settings.hosts.push(percent_decode(name)?);
        settings.ports.push(port.to_owned());
    }
    if settings.ports.iter().all(String::is_empty) {
        settings.ports.clear();
    }
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, query),
        None => (tail, ""),
    };
    settings.dbname = percent_decode(path.trim_start_matches('/'))?;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        settings.set(&key, value.into_owned())?;
    }
    Ok(settings)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(text: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let (name, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{text}`: `[` without `]`"))?;
        return Ok((name, after.strip_prefix(':').unwrap_or(after)));
    }
    Ok(text.split_once(':').unwrap_or((text, "")))
}

/// libpq's key/value form: `key=value` pairs separated by spaces, values optionally in single
/// quotes with `\'` and `\\` escapes.
fn parse_key_values(text: &str) -> Result<Settings, String> {
    let mut settings = Settings::default();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("`{key}` has no `=value`"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("the value of `{key}` has no closing quote")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        settings.set(&key, value)?;
    }
    Ok(settings)
}

fn percent_decode(s: &str) -> Result<String, String> {
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
    String::from_utf8(out).map_err(|_| "percent-encoding is not valid UTF-8".to_owned())
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The connection string with any password replaced by `***`, for messages and logs. Works on
/// both forms, also on strings that do not parse.
pub fn redact_url(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return redact_key_values(text);
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

fn redact_key_values(text: &str) -> String {
    let Some(at) = text.find("password") else {
        return text.to_owned();
    };
    let after = text[at + "password".len()..].trim_start();
    let Some(value) = after.strip_prefix('=') else {
        return text.to_owned();
    };
    let value = value.trim_start();
    let end = if let Some(quoted) = value.strip_prefix('\'') {
        let mut escaped = false;
        quoted
            .char_indices()
            .find(|&(_, c)| {
                let close = c == '\'' && !escaped;
                escaped = c == '\\' && !escaped;
                close
            })
            .map_or(value.len(), |(i, _)| i + 2)
    } else {
        value.find(char::is_whitespace).unwrap_or(value.len())
    };
    let value_start = text.len() - value.len();
    format!(
        "{}password=***{}",
        &text[..at],
        redact_key_values(&text[value_start + end..])
    )
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = if self.password.is_some() { ":***" } else { "" };
        let (sockets, hosts): (Vec<&Host>, Vec<&Host>) =
            self.hosts.iter().partition(|h| h.is_socket());
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        write!(
            f,
            "postgres://{}{password}@{}/{}",
            self.user,
            hosts.join(","),
            self.dbname
        )?;
        if let Some(socket) = sockets.first() {
            write!(f, "?host={}&port={}", socket.name, socket.port)?;
        }
        Ok(())
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
    /// Settings for an ordinary SQL connection to `host`, with its TLS connector.
    pub fn sql_config(
        &self,
        host: &Host,
    ) -> Result<
        (
            tokio_postgres::Config,
            tokio_postgres_rustls::MakeRustlsConnect,
        ),
        TlsSetupError,
    > {
        let mut config = tokio_postgres::Config::new();
        if host.is_socket() {
            config.host_path(&host.name);
        } else {
            config.host(&host.name);
        }
        config
            .port(host.port)
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

    /// A replication connection to `host` for `slot` (and `publication`, when it streams): who
    /// connects, where, over what TLS, under which application name.
    pub fn replication_config(
        &self,
        host: &Host,
        slot: &str,
        publication: &str,
    ) -> pgwire_replication::ReplicationConfig {
        pgwire_replication::ReplicationConfig::new(
            host.name.clone(),
            self.user.clone(),
            self.password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default(),
            self.dbname.clone(),
            slot,
            publication,
        )
        .with_port(host.port)
        .with_tls(self.replication_tls(host))
        .with_application_name(self.application_name.clone())
    }

    /// TLS settings for a replication connection to `host`.
    pub fn replication_tls(&self, host: &Host) -> TlsConfig {
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
                && host.name.parse::<std::net::IpAddr>().is_ok())
            .then(|| host.name.clone()),
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

    fn host(name: &str, port: u16) -> Host {
        Host {
            name: name.into(),
            port,
        }
    }

    #[test]
    fn parses_a_full_url() {
        let url: DatabaseUrl =
            "postgres://app%40x:p%3Ass@db.example:6543/orders?sslmode=verify-full&sslrootcert=/ca.pem"
                .parse()
                .unwrap();
        assert_eq!(url.hosts, [host("db.example", 6543)]);
        assert_eq!(url.user, "app@x");
        assert_eq!(url.password.as_ref().unwrap().expose(), "p:ss");
        assert_eq!(url.dbname, "orders");
        assert_eq!(url.sslmode, SslMode::VerifyFull);
        assert_eq!(url.target_session, TargetSession::Primary);
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
        assert_eq!(url.hosts, [host("/tmp/pg", 5499)]);
        assert_eq!(url.sslmode, SslMode::Disable, "no TLS over Unix sockets");
        let url: DatabaseUrl = "postgres://me@localhost".parse().unwrap();
        assert_eq!(url.hosts, [host("localhost", 5432)]);
        assert_eq!(url.dbname, "me");
        assert_eq!(url.sslmode, SslMode::Prefer);
    }

    #[test]
    fn takes_several_hosts_as_libpq_does() {
        let url: DatabaseUrl =
            "postgresql://app:pw@a:5432,b:5433,[::1]:5434/app?target_session_attrs=read-write"
                .parse()
                .unwrap();
        assert_eq!(
            url.hosts,
            [host("a", 5432), host("b", 5433), host("::1", 5434)]
        );
        assert_eq!(url.target_session, TargetSession::Primary);
        assert_eq!(
            url.to_string(),
            "postgres://app:***@a:5432,b:5433,[::1]:5434/app"
        );
        let url: DatabaseUrl = "postgres://app@/app?host=a,b&port=6000&target_session_attrs=any"
            .parse()
            .unwrap();
        assert_eq!(url.hosts, [host("a", 6000), host("b", 6000)]);
        assert_eq!(url.target_session, TargetSession::Any);
        let url: DatabaseUrl = "postgres://app@a,b:7000/app".parse().unwrap();
        assert_eq!(url.hosts, [host("a", 5432), host("b", 7000)]);
        for (bad, why) in [
            ("postgres://u@/d?host=a,b,c&port=1,2", "2 ports for 3 hosts"),
            (
                "postgres://u@a,b/d?target_session_attrs=standby",
                "not supported",
            ),
            ("postgres://u@[::1/d", "without `]`"),
        ] {
            let err = bad.parse::<DatabaseUrl>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn takes_key_value_strings() {
        let url: DatabaseUrl = "host=a,b port=5432,5433 dbname=app user=outbox \
                                password='its \\' secret' target_session_attrs=read-write"
            .parse()
            .unwrap();
        assert_eq!(url.hosts, [host("a", 5432), host("b", 5433)]);
        assert_eq!(url.user, "outbox");
        assert_eq!(url.dbname, "app");
        assert_eq!(url.password.as_ref().unwrap().expose(), "its ' secret");
        for (bad, why) in [
            ("host=a user", "no `=value`"),
            ("host=a user='x", "no closing quote"),
            ("host=a dbname=d", "no user"),
            ("host=a user=u frob=1", "unsupported parameter"),
        ] {
            let err = bad.parse::<DatabaseUrl>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
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
            ("postgres://u:secret@h:port/db", "not a number"),
            ("not a url", "expected a URL"),
            ("host=h password=secret port=x user=u", "not a number"),
        ] {
            let err = bad.parse::<DatabaseUrl>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
    }

    #[test]
    fn redacts_passwords_in_every_form() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:1/d?password=x&sslmode=require"),
            "postgres://u:***@h:1/d?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u:hunter2@a:1,b:2/d"),
            "postgres://u:***@a:1,b:2/d"
        );
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            redact_url("host=a password=hunter2 user=u"),
            "host=a password=*** user=u"
        );
        assert_eq!(
            redact_url("host=a password = 'hun ter\\'2' user=u"),
            "host=a password=*** user=u"
        );
    }

    #[test]
    fn builds_tls_configs_for_every_mode() {
        for mode in ["disable", "prefer", "require"] {
            let url: DatabaseUrl = format!("postgres://u@h/d?sslmode={mode}").parse().unwrap();
            assert!(url.sql_config(&url.hosts[0]).is_ok(), "{mode}");
        }
        let url: DatabaseUrl = "postgres://u@h/d?sslmode=verify-ca&sslrootcert=/does/not/exist.pem"
            .parse()
            .unwrap();
        let err = url
            .sql_config(&url.hosts[0])
            .err()
            .expect("missing CA file")
            .to_string();
        assert!(err.contains("/does/not/exist.pem"), "{err}");
        assert_eq!(
            url.replication_tls(&url.hosts[0]).mode,
            WireSslMode::VerifyCa
        );
    }
}
