//! Correlation ids: every request has one, in every log line it causes and in its response.
//!
//! The caller may send `x-correlation-id`; a value that is missing, too long or not made of
//! safe characters is replaced by a fresh UUID (rather than refused: a correlation id is a
//! diagnostic aid, not part of the request). Handlers run inside a tracing span carrying the id,
//! and inside a task-local [`scope`] so the changes they submit record it in the journal.

use tonic::metadata::{MetadataMap, MetadataValue};

/// The metadata key, lower case as gRPC metadata keys are.
pub const HEADER: &str = "x-correlation-id";

/// The longest correlation id kept as sent.
pub const MAX_CORRELATION_ID_LEN: usize = 128;

/// The caller's correlation id if it is usable, else a new UUID.
pub fn of_request(metadata: &MetadataMap) -> String {
    metadata
        .get(HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| is_usable(id))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string)
}

fn is_usable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CORRELATION_ID_LEN
        && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b':'))
}

tokio::task_local! {
    static CURRENT: String;
}

/// Runs `handler` with `id` as the current request's correlation id (see [`current`]).
pub async fn scope<F: std::future::Future>(id: String, handler: F) -> F::Output {
    CURRENT.scope(id, handler).await
}

/// The correlation id of the request being handled on this task, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(String::clone).ok()
}

/// Adds the id to outgoing metadata. Ids are checked or generated ASCII, so this always succeeds.
pub fn echo(metadata: &mut MetadataMap, id: &str) {
    if let Ok(value) = MetadataValue::try_from(id) {
        metadata.insert(HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_safe_ids_and_replaces_the_rest() {
        let mut metadata = MetadataMap::new();
        metadata.insert(HEADER, MetadataValue::from_static("order-42:retry.1"));
        assert_eq!(of_request(&metadata), "order-42:retry.1");
        metadata.insert(HEADER, MetadataValue::from_static("has space"));
        assert!(uuid::Uuid::try_parse(&of_request(&metadata)).is_ok());
        assert!(uuid::Uuid::try_parse(&of_request(&MetadataMap::new())).is_ok());
    }
}
