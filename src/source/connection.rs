//! Where and how to reach PostgreSQL: one connection string, used for both the SQL connection
//! (`tokio-postgres`) and the replication connection (`pgwire-replication`).
//!
//! Both libpq forms are accepted: a URL (`postgresql://user@a:5432,b:5432/app?sslmode=require`,
//! hosts also as `?host=a,b&port=5432,5433`) and key/value pairs (`host=a,b port=5432
//! dbname=app`). With several hosts, the first that is a primary is used, as libpq does with
//! `target_session_attrs=read-write`: after a failover outbox-cdc finds the new primary itself.
//!
//! Every parameter is either honoured as libpq honours it, on both connections, or refused when
//! the string is parsed (so at start, exit 2), naming it: a security setting is never weakened
//! silently. Where the two client crates differ, the weaker decides: `pgwire-replication` cannot
//! bind SCRAM to the TLS channel, so [`DatabaseUrl::replication_refusal`] refuses
//! `channel_binding=require` for the replication connection, and TLS is verified whenever a root
//! certificate is known, or refused where it cannot be. The `PG*` environment variables and
//! `~/.pgpass` are not read; `~/.postgresql/root.crt`, `postgresql.crt` and `postgresql.key` are,
//! as libpq reads them.

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

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

/// `channel_binding`, with libpq's meanings: SCRAM bound to the TLS channel, so that a server
/// that only relays the authentication cannot pass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    Disable,
    /// Bind when the server offers it (libpq's default).
    #[default]
    Prefer,
    /// Refuse a server that authenticates without binding (also trust, password and md5).
    Require,
}

impl FromStr for ChannelBinding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(ChannelBinding::Disable),
            "prefer" => Ok(ChannelBinding::Prefer),
            "require" => Ok(ChannelBinding::Require),
            other => Err(format!(
                "invalid channel_binding value `{other}` (expected disable, prefer or require)"
            )),
        }
    }
}

/// The default bound on one host's connection attempt, where libpq has none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The effective mode: `require` with a root certificate is `verify-ca`, as in libpq.
    pub sslmode: SslMode,
    /// The root certificates for `verify-ca` and `verify-full`; `None` there means the system's
    /// (`sslrootcert=system`, Mozilla's list built in).
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: String,
    pub target_session: TargetSession,
    /// The bound on each host's connection attempt, TLS and authentication included; `None`
    /// waits as long as the network does (`connect_timeout=0`).
    pub connect_timeout: Option<Duration>,
    pub channel_binding: ChannelBinding,
    /// `load_balance_hosts=random`: the hosts are tried in a random order.
    pub load_balance_hosts: bool,
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
    hostaddrs: Vec<String>,
    ports: Vec<String>,
    user: String,
    password: Option<String>,
    dbname: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    application_name: Option<String>,
    fallback_application_name: Option<String>,
    target_session_attrs: Option<String>,
    connect_timeout: Option<String>,
    channel_binding: Option<String>,
    load_balance_hosts: Option<String>,
}

/// libpq's connection parameters outbox-cdc does not implement: refused, not ignored.
const LIBPQ_UNSUPPORTED: &[&str] = &[
    "passfile",
    "require_auth",
    "client_encoding",
    "options",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "gsslib",
    "gssdelegation",
    "krbsrvname",
    "sslnegotiation",
    "sslcompression",
    "sslpassword",
    "sslcertmode",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslkeylogfile",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "min_protocol_version",
    "max_protocol_version",
    "requirepeer",
    "requiressl",
    "service",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
    "scram_client_key",
    "scram_server_key",
];

impl Settings {
    /// A `key=value` setting, as in libpq's key/value form and a URL's query string.
    fn set(&mut self, key: &str, value: String) -> Result<(), String> {
        let list = |value: &str| value.split(',').map(|v| v.trim().to_owned()).collect();
        match key {
            "host" => self.hosts = list(&value),
            "hostaddr" => self.hostaddrs = list(&value),
            "port" => self.ports = list(&value),
            "user" => self.user = value,
            "password" => self.password = Some(value),
            "dbname" => self.dbname = value,
            "sslmode" => self.sslmode = Some(value),
            "sslrootcert" => self.sslrootcert = Some(value),
            "sslcert" => self.sslcert = Some(value),
            "sslkey" => self.sslkey = Some(value),
            "application_name" => self.application_name = Some(value),
            "fallback_application_name" => self.fallback_application_name = Some(value),
            "target_session_attrs" => self.target_session_attrs = Some(value),
            "connect_timeout" => self.connect_timeout = Some(value),
            "channel_binding" => self.channel_binding = Some(value),
            "load_balance_hosts" => self.load_balance_hosts = Some(value),
            other if LIBPQ_UNSUPPORTED.contains(&other) => {
                return Err(format!(
                    "unsupported parameter `{other}`: outbox-cdc does not implement this libpq \
                     parameter; remove it (see `outbox-cdc run --help`, --database-url)"
                ));
            }
            other => {
                return Err(format!(
                    "unsupported parameter `{other}`: not a libpq connection parameter"
                ));
            }
        }
        Ok(())
    }

    fn check(self) -> Result<DatabaseUrl, String> {
        self.check_in(home_dir().as_deref())
    }

    /// Checks the settings; `home` is where `~/.postgresql` is looked for.
    fn check_in(self, home: Option<&Path>) -> Result<DatabaseUrl, String> {
        let given = |list: &[String]| !list.iter().all(String::is_empty);
        let names = match (given(&self.hosts), given(&self.hostaddrs)) {
            // libpq connects to hostaddr and verifies the certificate against host (and looks
            // the password up under it): two names for one server this does not keep apart.
            (true, true) => {
                return Err(
                    "hostaddr together with host is not supported: give host (a name or an \
                     address) alone"
                        .into(),
                );
            }
            (true, false) => self.hosts,
            (false, true) => self.hostaddrs,
            (false, false) => vec!["localhost".to_owned()],
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
        let explicit_mode: Option<SslMode> = self.sslmode.as_deref().map(str::parse).transpose()?;
        let tls = Tls::check(
            explicit_mode,
            self.sslrootcert.as_deref(),
            self.sslcert.map(PathBuf::from),
            self.sslkey.map(PathBuf::from),
            hosts.iter().all(Host::is_socket),
            home,
        )?;
        let connect_timeout = match self.connect_timeout.as_deref().map(str::trim) {
            None | Some("") => Some(DEFAULT_CONNECT_TIMEOUT),
            Some(text) => match text.parse::<i64>() {
                // As libpq: zero or less waits indefinitely, and less than 2 s is 2 s.
                Ok(seconds) if seconds <= 0 => None,
                Ok(seconds) => Some(Duration::from_secs(seconds.max(2) as u64)),
                Err(_) => {
                    return Err(format!(
                        "invalid integer value `{text}` for connection option `connect_timeout` \
                         (whole seconds, e.g. connect_timeout=10)"
                    ));
                }
            },
        };
        let load_balance_hosts = match self.load_balance_hosts.as_deref() {
            None | Some("disable") => false,
            Some("random") => true,
            Some(other) => {
                return Err(format!(
                    "invalid load_balance_hosts value `{other}` (expected disable or random)"
                ));
            }
        };
        Ok(DatabaseUrl {
            hosts,
            dbname: if self.dbname.is_empty() {
                self.user.clone()
            } else {
                self.dbname
            },
            user: self.user,
            password: self.password.map(Secret::new),
            sslmode: tls.mode,
            sslrootcert: tls.root,
            sslcert: tls.cert,
            sslkey: tls.key,
            application_name: self
                .application_name
                .or(self.fallback_application_name)
                .unwrap_or_else(|| "outbox-cdc".to_owned()),
            target_session: match &self.target_session_attrs {
                Some(attrs) => attrs.parse()?,
                None => TargetSession::default(),
            },
            connect_timeout,
            channel_binding: match &self.channel_binding {
                Some(binding) => binding.parse()?,
                None => ChannelBinding::default(),
            },
            load_balance_hosts,
        })
    }
}

/// `$HOME`, where libpq finds `~/.postgresql`.
fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
}

/// The TLS settings as libpq applies them.
struct Tls {
    mode: SslMode,
    root: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl Tls {
    fn check(
        explicit: Option<SslMode>,
        rootcert: Option<&str>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        sockets_only: bool,
        home: Option<&Path>,
    ) -> Result<Tls, String> {
        if sockets_only {
            // TLS does not apply to Unix sockets; libpq ignores sslmode there too.
            return Ok(Tls {
                mode: SslMode::Disable,
                root: None,
                cert: None,
                key: None,
            });
        }
        let in_home = |name: &str| {
            home.map(|home| home.join(".postgresql").join(name))
                .filter(|path| path.exists())
        };
        let mode_name = |mode: SslMode| match mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        };
        let (mode, root) = match rootcert {
            Some("system") => match explicit {
                None | Some(SslMode::VerifyFull) => (SslMode::VerifyFull, None),
                Some(weak) => {
                    return Err(format!(
                        "weak sslmode `{}` may not be used with sslrootcert=system (use \
                         verify-full)",
                        mode_name(weak)
                    ));
                }
            },
            Some(path) => (explicit.unwrap_or_default(), Some(PathBuf::from(path))),
            None => (explicit.unwrap_or_default(), in_home("root.crt")),
        };
        let mode = match (mode, &root) {
            (SslMode::Disable, _) => SslMode::Disable,
            (SslMode::VerifyCa | SslMode::VerifyFull, None) if rootcert != Some("system") => {
                return Err(format!(
                    "sslmode={} needs the certificate authority to verify the server with: \
                     sslrootcert=FILE, sslrootcert=system for the system's, or \
                     ~/.postgresql/root.crt (not found)",
                    mode_name(mode)
                ));
            }
            // libpq: with a root certificate, `require` verifies the chain.
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            // libpq verifies an optional TLS connection too when it has a root certificate;
            // the replication connection cannot make TLS optional and verified at once.
            (SslMode::Prefer, Some(root)) => {
                return Err(format!(
                    "sslmode={} with a root certificate ({}): libpq would verify the server's \
                     certificate whenever the server offers TLS, which outbox-cdc cannot do for \
                     an optional TLS connection; give sslmode=require, verify-ca or verify-full",
                    explicit.map_or("prefer (the default)", mode_name),
                    root.display()
                ));
            }
            (mode, _) => mode,
        };
        let (cert, key) = match (cert, key) {
            (Some(cert), key) => {
                let key = key.or_else(|| in_home("postgresql.key"));
                (Some(cert), key)
            }
            (None, key) => match in_home("postgresql.crt") {
                Some(cert) => (Some(cert), key.or_else(|| in_home("postgresql.key"))),
                None => (None, key),
            },
        };
        let (cert, key) = match (cert, key, mode) {
            (_, _, SslMode::Disable) => (None, None),
            (Some(cert), None, _) => {
                return Err(format!(
                    "certificate present ({}), but not its private key: give sslkey, or put it \
                     in ~/.postgresql/postgresql.key",
                    cert.display()
                ));
            }
            (None, Some(_), _) => {
                return Err("sslkey without sslcert: give both".into());
            }
            (cert, key, _) => (cert, key),
        };
        Ok(Tls {
            mode,
            root: if mode == SslMode::Disable { None } else { root },
            cert,
            key,
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

/// A URL part's percent-encoding undone, as for the NATS URL (`crate::sink::NatsUrls`).
fn percent_decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| "percent-encoding is not valid UTF-8".to_owned())
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

/// A host that did not complete the connection within `connect_timeout`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no connection within connect_timeout ({}s)", .0.as_secs())]
pub struct ConnectTimeout(pub Duration);

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
            .channel_binding(match self.channel_binding {
                ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
                ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
                ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
            })
            // The addresses one name resolves to, in a random order too.
            .load_balance_hosts(if self.load_balance_hosts {
                tokio_postgres::config::LoadBalanceHosts::Random
            } else {
                tokio_postgres::config::LoadBalanceHosts::Disable
            })
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
        if let Some(timeout) = self.connect_timeout {
            config.connect_timeout(timeout);
        }
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
        Ok((config, tls))
    }

    /// The hosts in the order to try them: as given, or shuffled with `load_balance_hosts=random`.
    pub fn hosts_to_try(&self) -> Vec<Host> {
        let mut hosts = self.hosts.clone();
        if self.load_balance_hosts {
            // Fisher-Yates, seeded by the standard library's per-process random keys.
            let random = std::collections::hash_map::RandomState::new();
            for i in (1..hosts.len()).rev() {
                let mut hasher = random.build_hasher();
                hasher.write_usize(i);
                let j = (hasher.finish() % (i as u64 + 1)) as usize;
                hosts.swap(i, j);
            }
        }
        hosts
    }

    /// Runs one host's connection attempt (TCP, TLS, authentication) within `connect_timeout`,
    /// as libpq bounds it.
    pub async fn within_connect_timeout<F: Future>(
        &self,
        connect: F,
    ) -> Result<F::Output, ConnectTimeout> {
        match self.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, connect)
                .await
                .map_err(|_| ConnectTimeout(limit)),
            None => Ok(connect.await),
        }
    }

    /// Why a replication connection (`pgwire-replication`) cannot keep this string's promises,
    /// if it cannot: it authenticates with SCRAM-SHA-256 without channel binding, so it would
    /// connect where libpq with `channel_binding=require` refuses.
    pub fn replication_refusal(&self) -> Option<&'static str> {
        (self.channel_binding == ChannelBinding::Require).then_some(
            "channel_binding=require: the replication connection cannot bind its authentication \
             to the TLS channel (pgwire-replication has no SCRAM-SHA-256-PLUS), and outbox-cdc \
             does not connect without what you required; authenticate the server with \
             sslmode=verify-full instead",
        )
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

    /// Parses `text` with `home` as `$HOME`.
    fn parse_in(text: &str, home: &std::path::Path) -> Result<DatabaseUrl, String> {
        let settings = match text.split_once("://") {
            Some((_, rest)) => parse_url(rest)?,
            None => parse_key_values(text)?,
        };
        settings.check_in(Some(home))
    }

    #[test]
    fn keeps_libpqs_promises_or_refuses_naming_the_parameter() {
        let home = tempfile::tempdir().unwrap();
        let parse = |text: &str| parse_in(text, home.path());
        let url = parse("postgres://u@h/d").unwrap();
        assert_eq!(url.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(url.channel_binding, ChannelBinding::Prefer);
        assert!(!url.load_balance_hosts);
        for (timeout, expected) in [("5", Some(5)), ("1", Some(2)), ("0", None), ("-3", None)] {
            let url = parse(&format!("postgres://u@h/d?connect_timeout={timeout}")).unwrap();
            assert_eq!(
                url.connect_timeout,
                expected.map(Duration::from_secs),
                "{timeout}"
            );
        }
        let url = parse(
            "host=h user=u channel_binding=require load_balance_hosts=random \
                         fallback_application_name=orders",
        )
        .unwrap();
        assert_eq!(url.channel_binding, ChannelBinding::Require);
        assert!(url.replication_refusal().is_some());
        assert!(url.load_balance_hosts);
        assert_eq!(url.application_name, "orders");
        let url = parse("host=h user=u application_name=a fallback_application_name=b").unwrap();
        assert_eq!(url.application_name, "a");
        let url = parse("hostaddr=10.0.0.1 port=6000 user=u").unwrap();
        assert_eq!(url.hosts, [host("10.0.0.1", 6000)]);
        for (bad, why) in [
            (
                "postgres://u@h/d?connect_timeout=abc",
                "`abc` for connection option `connect_timeout`",
            ),
            ("postgres://u@h/d?connect_timeout=10s", "`connect_timeout`"),
            (
                "postgres://u@h/d?channel_binding=always",
                "invalid channel_binding value `always`",
            ),
            (
                "postgres://u@h/d?load_balance_hosts=yes",
                "invalid load_balance_hosts value `yes`",
            ),
            (
                "host=a hostaddr=10.0.0.1 user=u",
                "hostaddr together with host",
            ),
            (
                "postgres://u@h/d?sslcrl=/crl.pem",
                "`sslcrl`: outbox-cdc does not implement",
            ),
            (
                "postgres://u@h/d?require_auth=scram-sha-256",
                "`require_auth`: outbox-cdc does not",
            ),
            (
                "postgres://u@h/d?frobnicate=1",
                "`frobnicate`: not a libpq connection parameter",
            ),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn verifies_the_server_whenever_libpq_would() {
        let home = tempfile::tempdir().unwrap();
        let parse = |text: &str| parse_in(text, home.path());
        // verify-* needs a root certificate: none given, none in ~/.postgresql.
        let err = parse("postgres://u@h/d?sslmode=verify-full").unwrap_err();
        assert!(
            err.contains("sslmode=verify-full needs the certificate authority"),
            "{err}"
        );
        assert!(err.contains("~/.postgresql/root.crt"), "{err}");
        // `system`: the system's roots, verify-full unless said otherwise, nothing weaker.
        let url = parse("postgres://u@h/d?sslrootcert=system").unwrap();
        assert_eq!((url.sslmode, url.sslrootcert), (SslMode::VerifyFull, None));
        let err = parse("postgres://u@h/d?sslrootcert=system&sslmode=require").unwrap_err();
        assert!(err.contains("weak sslmode `require`"), "{err}");
        // With a root certificate, `require` verifies the chain; `prefer` cannot.
        let url = parse("postgres://u@h/d?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(url.sslmode, SslMode::VerifyCa);
        let err = parse("postgres://u@h/d?sslrootcert=/ca.pem").unwrap_err();
        assert!(
            err.contains("sslmode=prefer (the default) with a root certificate"),
            "{err}"
        );
        assert_eq!(
            parse("postgres://u@h/d?sslmode=require").unwrap().sslmode,
            SslMode::Require
        );
        // ~/.postgresql, as libpq reads it.
        let dir = home.path().join(".postgresql");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("root.crt"), "").unwrap();
        let url = parse("postgres://u@h/d?sslmode=verify-ca").unwrap();
        assert_eq!(url.sslrootcert, Some(dir.join("root.crt")));
        assert_eq!(
            parse("postgres://u@h/d?sslmode=require").unwrap().sslmode,
            SslMode::VerifyCa
        );
        assert!(
            parse("postgres://u@h/d").is_err(),
            "prefer with a root certificate"
        );
        assert_eq!(
            parse("postgres://u@h/d?sslmode=disable")
                .unwrap()
                .sslrootcert,
            None
        );
        std::fs::write(dir.join("postgresql.crt"), "").unwrap();
        let err = parse("postgres://u@h/d?sslmode=require").unwrap_err();
        assert!(err.contains("but not its private key"), "{err}");
        std::fs::write(dir.join("postgresql.key"), "").unwrap();
        let url = parse("postgres://u@h/d?sslmode=require").unwrap();
        assert_eq!(url.sslcert, Some(dir.join("postgresql.crt")));
        assert_eq!(url.sslkey, Some(dir.join("postgresql.key")));
        // Unix sockets: no TLS, whatever is around.
        let url = parse("postgres://u@/d?host=/tmp&sslmode=verify-full").unwrap();
        assert_eq!((url.sslmode, url.sslcert), (SslMode::Disable, None));
    }

    #[test]
    fn random_load_balancing_tries_every_host_in_some_order() {
        let url: DatabaseUrl = "postgres://u@a,b,c,d,e/d?load_balance_hosts=random"
            .parse()
            .unwrap();
        let mut orders = std::collections::HashSet::new();
        for _ in 0..50 {
            let hosts = url.hosts_to_try();
            let mut sorted = hosts.clone();
            sorted.sort_by(|x, y| x.name.cmp(&y.name));
            assert_eq!(sorted, url.hosts);
            orders.insert(hosts.iter().map(|h| h.name.clone()).collect::<String>());
        }
        assert!(orders.len() > 5, "{orders:?}");
        let url: DatabaseUrl = "postgres://u@a,b,c/d".parse().unwrap();
        assert_eq!(url.hosts_to_try(), url.hosts);
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
