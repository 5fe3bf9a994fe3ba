//! Correlation ids and the request's context: every request has a correlation id, in every log
//! line it causes and in its response, and the changes it submits record who asked.
//!
//! The caller may send `x-correlation-id`; a value that is missing, too long or not made of
//! safe characters is replaced by a fresh UUID (rather than refused: a correlation id is a
//! diagnostic aid, not part of the request). Handlers run inside a tracing span carrying the id,
//! and inside a task-local [`scope`] holding the [`RequestContext`] (correlation id, calling
//! service, peer address, user agent), so the changes they submit record it in the journal.

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::engine::record::RequestContext;

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

/// The metadata key of the caller's user agent (set by every gRPC client library).
const USER_AGENT: &str = "user-agent";

/// The longest user agent kept; longer ones are cut (at a character boundary).
const MAX_USER_AGENT_LEN: usize = 256;

/// The context of a request: its correlation id (see [`of_request`]), the calling service once
/// authenticated, the peer address and the user agent.
pub fn context_of(
    metadata: &MetadataMap,
    correlation_id: String,
    caller: Option<String>,
    peer: Option<std::net::SocketAddr>,
) -> RequestContext {
    let user_agent = metadata.get(USER_AGENT).and_then(|value| value.to_str().ok()).map(|agent| {
        let mut end = agent.len().min(MAX_USER_AGENT_LEN);
        while !agent.is_char_boundary(end) {
            end -= 1;
        }
        agent[..end].to_owned()
    });
    RequestContext { correlation_id, caller, peer: peer.map(|address| address.to_string()), user_agent }
}

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// Runs `handler` with `context` as the current request's context (see [`current`]).
pub async fn scope<F: std::future::Future>(context: RequestContext, handler: F) -> F::Output {
    CURRENT.scope(context, handler).await
}

/// The context of the request being handled on this task, if any.
pub fn current() -> Option<Box<RequestContext>> {
    CURRENT.try_with(|context| Box::new(context.clone())).ok()
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
