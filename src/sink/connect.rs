//! Where NATS is and how to authenticate to it: the server URLs (parsed once, credentials kept
//! apart and never printed), credentials files, TLS, and the connect options made of them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Event, ServerError};
use tokio::sync::watch;

use super::fence::Fence;
use super::permissions::Denials;
use super::{JetStreamSink, SinkConfig, SinkError, acks};
use crate::secret::Secret;

/// The NATS servers to connect to, from a comma-separated list of URLs (`nats://` assumed when
/// no scheme is given). Credentials in a URL (`user:password@host`, `token@host`) are taken out:
/// async-nats ignores them there, so they become connect options.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrls {
    addresses: Vec<async_nats::ServerAddr>,
    credentials: Option<UrlCredentials>,
    redacted: String,
}

#[derive(Clone, PartialEq, Eq)]
enum UrlCredentials {
    UserPassword(String, Secret),
    Token(Secret),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --nats-url `{redacted}`: {reason}")]
pub struct NatsUrlError {
    redacted: String,
    reason: String,
}

impl FromStr for NatsUrls {
    type Err = NatsUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let redacted = redact_nats_url(text);
        let invalid = |reason: String| NatsUrlError {
            redacted: redacted.clone(),
            reason,
        };
        let mut addresses = Vec::new();
        let mut credentials: Option<UrlCredentials> = None;
        for part in text.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let with_scheme = if part.contains("://") {
                part.to_owned()
            } else {
                format!("nats://{part}")
            };
            let mut url = url::Url::parse(&with_scheme)
                .map_err(|e| invalid(format!("`{}` is not a URL: {e}", redact_nats_url(part))))?;
            if !url.username().is_empty() {
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                let found = match url.password() {
                    Some(password) => UrlCredentials::UserPassword(
                        decode(url.username()),
                        Secret::new(decode(password)),
                    ),
                    None => UrlCredentials::Token(Secret::new(decode(url.username()))),
                };
                if credentials.as_ref().is_some_and(|c| *c != found) {
                    return Err(invalid(
                        "the URLs carry different credentials; give every server the same".into(),
                    ));
                }
                credentials = Some(found);
                let _ = url.set_username("");
                let _ = url.set_password(None);
            }
            let address = url
                .as_str()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid(format!("`{}`: {e}", redact_nats_url(part))))?;
            addresses.push(address);
        }
        if addresses.is_empty() {
            return Err(invalid("no server URL given".into()));
        }
        Ok(NatsUrls {
            addresses,
            credentials,
            redacted,
        })
    }
}

impl NatsUrls {
    pub fn addresses(&self) -> Vec<async_nats::ServerAddr> {
        self.addresses.clone()
    }
}

/// Prints the URLs with credentials hidden.
impl fmt::Display for NatsUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for NatsUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// NATS URLs with credentials hidden: `user:password@` becomes `user:***@`, and a token
/// (`token@`) becomes `***@`. Works on comma-separated lists, also ones that do not parse.
pub fn redact_nats_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let redacted = match rest.rsplit_once('@') {
                Some((credentials, host)) => match credentials.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("***@{host}"),
                },
                None => rest.to_owned(),
            };
            if scheme.is_empty() {
                redacted
            } else {
                format!("{scheme}://{redacted}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// How to authenticate to NATS and verify it, besides credentials in the URL.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    /// A `.creds` file (user JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// A file holding an NKey seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
    /// CA certificate(s) to verify the server with; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl NatsAuth {
    /// Connect options for `urls`: their credentials, then the files'.
    pub async fn connect_options(
        &self,
        urls: &NatsUrls,
    ) -> Result<async_nats::ConnectOptions, SinkError> {
        let invalid = |detail: String| SinkError::Connect {
            target: urls.to_string(),
            detail,
            transient: false,
        };
        let mut options = async_nats::ConnectOptions::new();
        match &urls.credentials {
            Some(UrlCredentials::UserPassword(user, password)) => {
                options = options.user_and_password(user.clone(), password.expose().to_owned())
            }
            Some(UrlCredentials::Token(token)) => {
                options = options.token(token.expose().to_owned())
            }
            None => {}
        }
        if let Some(path) = &self.creds_file {
            options = options.credentials_file(path).await.map_err(|e| {
                invalid(format!(
                    "reading the credentials file {}: {e}",
                    path.display()
                ))
            })?;
        }
        if let Some(path) = &self.nkey_file {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                invalid(format!(
                    "reading the NKey seed file {}: {e}",
                    path.display()
                ))
            })?;
            let seed = seed.trim();
            if !seed.starts_with('S') {
                return Err(invalid(format!(
                    "{} does not hold an NKey seed (it starts with `S`, e.g. SUAM…)",
                    path.display()
                )));
            }
            options = options.nkey(seed.to_owned());
        }
        if let Some(path) = &self.tls_ca {
            require_file(path, "--nats-tls-ca").map_err(invalid)?;
            options = options
                .add_root_certificates(path.clone())
                .require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                require_file(cert, "--nats-tls-cert").map_err(invalid)?;
                require_file(key, "--nats-tls-key").map_err(invalid)?;
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    "--nats-tls-cert and --nats-tls-key go together".into(),
                ));
            }
        }
        Ok(options)
    }

    /// A plain client for a one-off read (`status`, `verify`): no reconnect tuning, a failure
    /// to connect is the caller's to report. Requests on it go through [`Denials::guard`], so
    /// that a subject the user may not use fails at once, named.
    pub async fn connect_once(
        &self,
        urls: &NatsUrls,
    ) -> Result<(async_nats::Client, Denials), SinkError> {
        let (recorder, denials) = Denials::new();
        let client = self
            .connect_options(urls)
            .await?
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let recorder = recorder.clone();
                async move {
                    if let Event::ServerError(ServerError::Other(text)) = event {
                        recorder.server_error(&text);
                    }
                }
            })
            .connect(urls.addresses())
            .await
            .map_err(|e| SinkError::Connect {
                target: urls.to_string(),
                detail: e.to_string(),
                transient: true,
            })?;
        Ok((client, denials))
    }
}

fn require_file(path: &Path, flag: &str) -> Result<(), String> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| format!("{flag} {}: {e}", path.display()))
}

impl<T> JetStreamSink<T> {
    /// Connects; one attempt (the caller retries with backoff).
    pub async fn connect(config: &SinkConfig) -> Result<Self, SinkError> {
        let target = config.urls.to_string();
        let (disconnected_tx, disconnected) = watch::channel(false);
        let (recorder, denials) = Denials::new();
        let connected_once = Arc::new(AtomicBool::new(false));
        let connected_flag = connected_once.clone();
        let options = config
            .auth
            .connect_options(&config.urls)
            .await?
            .name("outbox-cdc")
            .connection_timeout(Duration::from_secs(5))
            // Every in-flight publish's ack waits in the ack subscription's buffer; a full buffer
            // would drop acks (and time the session out).
            .subscription_capacity((config.max_in_flight + 1024).max(64 * 1024))
            .event_callback(move |event| {
                let disconnected_tx = disconnected_tx.clone();
                let connected_flag = connected_flag.clone();
                let recorder = recorder.clone();
                async move {
                    match event {
                        Event::Connected => connected_flag.store(true, Ordering::SeqCst),
                        Event::Disconnected | Event::Closed => {
                            let _ = disconnected_tx.send(true);
                        }
                        // A refused subject: whatever needed it waits in vain (see
                        // `permissions`); the session ends on it at once.
                        Event::ServerError(ServerError::Other(text)) => {
                            recorder.server_error(&text);
                        }
                        _ => {}
                    }
                }
            })
            // See the module doc: after the first connection, never reconnect inside a session.
            .reconnect_delay_callback(move |_attempt| {
                if connected_once.load(Ordering::SeqCst) {
                    Duration::from_secs(365 * 24 * 3600)
                } else {
                    Duration::ZERO
                }
            });
        let client = options
            .connect(config.urls.addresses())
            .await
            .map_err(|err| {
                let rejected = crate::tls::certificate_rejected(&err);
                let mut detail = err.to_string();
                if rejected && detail.contains("alert") {
                    detail.push_str(
                        " (the server refused this client's certificate, or its absence: check \
                         --nats-tls-cert and --nats-tls-key)",
                    );
                }
                SinkError::Connect {
                    target,
                    transient: !rejected
                        && !matches!(
                            err.kind(),
                            async_nats::ConnectErrorKind::Authentication
                            | async_nats::ConnectErrorKind::AuthorizationViolation
                            | async_nats::ConnectErrorKind::ServerParse
                            // A certificate that does not verify, or TLS required on one side only.
                            | async_nats::ConnectErrorKind::Tls
                        ),
                    detail,
                }
            })?;
        let acks = acks::Acks::subscribe(&client, config.ack_timeout)
            .await
            .map_err(|e| SinkError::Connect {
                target: config.urls.to_string(),
                detail: format!("subscribing to JetStream acks: {e}"),
                transient: true,
            })?;
        let context = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client.clone());
        // Unique to this connection: a batch of an earlier session that JetStream still holds
        // uncommitted cannot be confused with a new one.
        let batch_prefix = client
            .new_inbox()
            .rsplit('.')
            .next()
            .unwrap_or("outbox-cdc")
            .to_owned();
        Ok(JetStreamSink {
            client,
            context,
            acks,
            fence: Fence::off(),
            warned_unfenced: false,
            ack_timeout: config.ack_timeout,
            disconnected,
            denials,
            replicas: 1,
            batch_prefix,
            batches_started: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_nats_credentials() {
        assert_eq!(
            redact_nats_url("nats://alice:s3cret@h1:4222, tls://tok3n@h2:4222,h3:4222"),
            "nats://alice:***@h1:4222,tls://***@h2:4222,h3:4222"
        );
    }

    #[test]
    fn parses_url_lists_and_keeps_credentials_apart() {
        let urls: NatsUrls = "nats://alice:s%40cret@h1:4222, h2:4223".parse().unwrap();
        assert_eq!(urls.addresses().len(), 2);
        assert_eq!(urls.to_string(), "nats://alice:***@h1:4222,h2:4223");
        assert!(!format!("{urls:?}").contains("cret"));
        assert!(
            urls.addresses()
                .iter()
                .all(|a| !format!("{a:?}").contains("alice"))
        );
        match &urls.credentials {
            Some(UrlCredentials::UserPassword(user, password)) => {
                assert_eq!((user.as_str(), password.expose()), ("alice", "s@cret"))
            }
            _ => panic!("user and password expected"),
        }
        for (bad, needle) in [
            ("nats://a:b@h1,nats://c:d@h2", "different credentials"),
            (" , ", "no server URL"),
            ("http://h1", "h1"),
            ("nats://h1:notaport", "not a URL"),
        ] {
            let err = bad.parse::<NatsUrls>().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
