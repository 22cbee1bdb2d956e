//! The replay checkpoint: the newest published position, in a NATS KV bucket.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::{NatsAuth, NatsUrls, SinkError};
use crate::lsn::Lsn;

/// The newest published position, kept in a NATS KV bucket under the slot's name, so that a
/// restart with a replay window resumes after what was published instead of replaying the window.
pub struct Checkpoint {
    store: jetstream::kv::Store,
    bucket: String,
    key: String,
    saved: Lsn,
}

impl Checkpoint {
    /// Opens (creating if missing) the bucket; returns it with the saved position, if any.
    pub async fn open(
        context: &jetstream::Context,
        bucket: &str,
        key: &str,
    ) -> Result<(Checkpoint, Option<Lsn>), SinkError> {
        let fail = |detail: String| SinkError::Checkpoint {
            bucket: bucket.to_owned(),
            detail,
        };
        let store = match context.get_key_value(bucket).await {
            Ok(store) => store,
            Err(_) => {
                // The bucket's backing stream is created directly: async-nats's
                // `create_key_value` first reads the account info, whose shape on servers
                // before 2.10 it fails to parse. This is the stream it would create.
                context
                    .get_or_create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        description: Some(
                            "outbox-cdc: newest published LSN per replication slot".into(),
                        ),
                        max_messages_per_subject: 1,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        storage: stream::StorageType::File,
                        duplicate_window: Duration::from_secs(120),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| fail(format!("creating the bucket: {e}")))?;
                context
                    .get_key_value(bucket)
                    .await
                    .map_err(|e| fail(format!("opening the bucket: {e}")))?
            }
        };
        let saved =
            match store.get(key).await {
                Ok(Some(value)) => {
                    let text = String::from_utf8_lossy(&value);
                    Some(text.parse::<Lsn>().map_err(|e| {
                        fail(format!("key `{key}` holds `{text}`, not an LSN: {e}"))
                    })?)
                }
                Ok(None) => None,
                Err(e) => return Err(fail(format!("reading key `{key}`: {e}"))),
            };
        let checkpoint = Checkpoint {
            store,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            saved: saved.unwrap_or(Lsn::ZERO),
        };
        Ok((checkpoint, saved))
    }

    /// Reads the saved position without creating anything (for `status`): None when the bucket
    /// or the key does not exist.
    pub async fn read(
        urls: &NatsUrls,
        auth: &NatsAuth,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Lsn>, SinkError> {
        let fail = |detail: String| SinkError::Checkpoint {
            bucket: bucket.to_owned(),
            detail,
        };
        let client = auth
            .connect_options(urls)
            .await?
            .connection_timeout(Duration::from_secs(5))
            .connect(urls.addresses())
            .await
            .map_err(|e| SinkError::Connect {
                target: urls.to_string(),
                detail: e.to_string(),
                transient: true,
            })?;
        let context = jetstream::new(client);
        let store = match context.get_key_value(bucket).await {
            Ok(store) => store,
            Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                return Ok(None);
            }
            Err(e) => return Err(fail(format!("opening the bucket: {e}"))),
        };
        match store.get(key).await {
            Ok(Some(value)) => {
                let text = String::from_utf8_lossy(&value);
                text.parse::<Lsn>()
                    .map(Some)
                    .map_err(|e| fail(format!("key `{key}` holds `{text}`, not an LSN: {e}")))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(fail(format!("reading key `{key}`: {e}"))),
        }
    }

    /// Saves `lsn` when it is newer than what was saved.
    pub async fn save(&mut self, lsn: Lsn) -> Result<(), SinkError> {
        if lsn <= self.saved {
            return Ok(());
        }
        self.store
            .put(&self.key, lsn.to_string().into())
            .await
            .map_err(|e| SinkError::Checkpoint {
                bucket: self.bucket.clone(),
                detail: format!("writing key `{}`: {e}", self.key),
            })?;
        self.saved = lsn;
        Ok(())
    }
}
