//! The checkpoint: one value in a NATS KV bucket, kept by the pipeline (where outbox-cdc got
//! to, and on which database history); the sink only stores it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use super::permissions::Denials;
use super::{JetStreamSink, NatsAuth, NatsUrls, SinkError};

/// Reads `key` from the bucket stream's leader. Not with the KV's direct get, which any replica
/// answers: a replica back from a restart that has not caught up yet answers with an older
/// checkpoint, and a slot confirmed past that looks moved by someone else (a stop naming a gap
/// that is not there). Seen on a three-node cluster with the publisher's node killed.
async fn load(
    store: &jetstream::kv::Store,
    bucket: &str,
    key: &str,
) -> Result<Option<Bytes>, String> {
    let subject = format!("$KV.{bucket}.{key}");
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => Ok(kv_value(&message.headers, message.payload)),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!("reading key `{key}`: {e}")),
    }
}

/// The value a KV bucket's message holds: none when the message records a delete or a purge.
fn kv_value(headers: &HeaderMap, payload: Bytes) -> Option<Bytes> {
    match headers.get(KV_OPERATION).map(|v| v.as_str()) {
        Some("DEL" | "PURGE") => None,
        _ => Some(payload),
    }
}

/// The header in which a KV bucket's messages say what they record (absent on a put).
const KV_OPERATION: &str = "KV-Operation";

/// One key of a NATS KV bucket: the slot's name in `--checkpoint-bucket`.
pub struct Checkpoint {
    store: jetstream::kv::Store,
    bucket: String,
    key: String,
    /// The connection's permission refusals: a save the server refuses fails at once.
    denials: Option<Denials>,
}

impl<T> JetStreamSink<T> {
    /// Opens the checkpoint (see [`Checkpoint::open`]) on this connection, with as many copies
    /// as [`JetStreamSink::replicas`]; a subject the server refuses fails it at once, named.
    pub async fn open_checkpoint(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(Checkpoint, Option<Bytes>), SinkError> {
        let (mut checkpoint, saved) = self
            .denials
            .guard(Checkpoint::open(&self.context, bucket, key, self.replicas))
            .await?;
        checkpoint.denials = Some(self.denials.clone());
        Ok((checkpoint, saved))
    }
}

impl Checkpoint {
    /// Opens (creating if missing, with `replicas` copies in a cluster) the bucket; returns it
    /// with the saved value, if any. An existing bucket with fewer copies is warned about, not
    /// changed.
    pub async fn open(
        context: &jetstream::Context,
        bucket: &str,
        key: &str,
        replicas: usize,
    ) -> Result<(Checkpoint, Option<Bytes>), SinkError> {
        let fail = |detail: String| SinkError::Checkpoint {
            bucket: bucket.to_owned(),
            detail,
        };
        let store = match context.get_key_value(bucket).await {
            Ok(store) => {
                let kept = store.stream.cached_info().config.num_replicas.max(1);
                if kept < replicas {
                    tracing::warn!(
                        bucket,
                        replicas = kept,
                        wanted = replicas,
                        "the checkpoint's KV bucket `{bucket}` keeps {kept} copies, fewer than the \
                         {replicas} wanted (--checkpoint-replicas, or the outbox's streams'); it \
                         is left as it is: raise them with `nats stream edit KV_{bucket} \
                         --replicas {replicas}`"
                    );
                }
                store
            }
            Err(_) => {
                // The bucket's backing stream is created directly: async-nats's
                // `create_key_value` first reads the account info, whose shape on servers
                // before 2.10 it fails to parse. This is the stream it would create.
                context
                    .get_or_create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        description: Some(
                            "outbox-cdc: how far each replication slot's events were published"
                                .into(),
                        ),
                        max_messages_per_subject: 1,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        storage: stream::StorageType::File,
                        duplicate_window: Duration::from_secs(120),
                        num_replicas: replicas.max(1),
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
        let saved = load(&store, bucket, key).await.map_err(fail)?;
        let checkpoint = Checkpoint {
            store,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            denials: None,
        };
        Ok((checkpoint, saved))
    }

    /// Reads the saved value without creating anything (for `status`): None when the bucket
    /// or the key does not exist.
    pub async fn read(
        urls: &NatsUrls,
        auth: &NatsAuth,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Bytes>, SinkError> {
        let fail = |detail: String| SinkError::Checkpoint {
            bucket: bucket.to_owned(),
            detail,
        };
        let (client, denials) = auth.connect_once(urls).await?;
        let context = jetstream::new(client);
        let read = async {
            let store = match context.get_key_value(bucket).await {
                Ok(store) => store,
                Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                    // A refused request looks the same: the refusal is the error then.
                    return match denials.error() {
                        Some(denied) => Err(denied),
                        None => Ok(None),
                    };
                }
                Err(e) => return Err(fail(format!("opening the bucket: {e}"))),
            };
            load(&store, bucket, key).await.map_err(fail)
        };
        denials.guard(read).await
    }

    /// Saves `value`.
    pub async fn save(&mut self, value: Bytes) -> Result<(), SinkError> {
        let put = async {
            self.store
                .put(&self.key, value)
                .await
                .map_err(|e| SinkError::Checkpoint {
                    bucket: self.bucket.clone(),
                    detail: format!("writing key `{}`: {e}", self.key),
                })
                .map(|_| ())
        };
        match &self.denials {
            Some(denials) => denials.guard(put).await,
            None => put.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_or_purged_key_holds_no_checkpoint() {
        let value = Bytes::from_static(b"{}");
        assert_eq!(
            kv_value(&HeaderMap::new(), value.clone()),
            Some(value.clone())
        );
        for operation in ["DEL", "PURGE"] {
            let mut headers = HeaderMap::new();
            headers.insert(KV_OPERATION, operation);
            assert_eq!(kv_value(&headers, value.clone()), None, "{operation}");
        }
    }
}
