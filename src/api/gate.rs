//! The one way into every RPC: the gate each handler goes through.
//!
//! In order, for every request: take its correlation id and open a span for it; shed it if the
//! server already has its limit of requests in flight (RESOURCE_EXHAUSTED, not a queue: a
//! queue would only turn overload into timeouts); authenticate the caller and check the RPC is
//! in its scopes; run the handler with the request's context (correlation id, caller, peer, user
//! agent) and caller in task-locals, so the changes it submits record them and their scopes are
//! checked, within its deadline (the caller's `grpc-timeout` or the server's limit, whichever is
//! shorter); then map the outcome to a status (in `status`), echo the correlation id, and record
//! the RPC's code and latency in the metrics.
//!
//! The deadline is enforced here rather than by tonic's server timeout because a deadline that
//! passes while a change waits for its batch must say that the change may still become durable
//! (DEADLINE_EXCEEDED with that reason), and because a server-wide timeout would also cut
//! long-lived streams.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::{Code, Request as GrpcRequest, Response, Status};
use tracing::Instrument;

use super::auth::{self, Authenticator};
use super::correlation;
use super::status::ApiError;
use crate::metrics::{MethodLabels, Metrics, RpcLabels};

/// The metadata key of the caller's deadline (gRPC over HTTP/2).
const GRPC_TIMEOUT: &str = "grpc-timeout";

pub struct Gate {
    authenticator: Authenticator,
    in_flight: Semaphore,
    max_in_flight: usize,
    /// The longest any request may run, whatever its caller asks.
    request_timeout_ms: u64,
    metrics: Arc<Metrics>,
}

impl Gate {
    pub fn new(
        authenticator: Authenticator,
        max_in_flight: usize,
        request_timeout_ms: u64,
        metrics: Arc<Metrics>,
    ) -> Gate {
        Gate { authenticator, in_flight: Semaphore::new(max_in_flight), max_in_flight, request_timeout_ms, metrics }
    }

    /// Runs `handler` for `request` of the RPC `method` behind the gate (see the module docs).
    pub async fn handle<T, R, F, Fut>(
        &self,
        method: &'static str,
        request: GrpcRequest<T>,
        handler: F,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, ApiError>>,
    {
        let mut tally = RpcTally { metrics: &self.metrics, method, started: Instant::now(), code: None };
        let correlation_id = correlation::of_request(request.metadata());
        let span = tracing::info_span!("rpc", method, correlation_id = %correlation_id, caller = tracing::field::Empty);
        let result =
            self.admit_and_run(method, request, handler, correlation_id.clone()).instrument(span.clone()).await;
        // Inside the span: mapping an internal failure to its status logs it, and that line must
        // carry the request's correlation id like every other (until session 22 it did not).
        let _in_span = span.enter();
        match result {
            Ok(body) => {
                let mut response = Response::new(body);
                correlation::echo(response.metadata_mut(), &correlation_id);
                tally.code = Some(Code::Ok);
                Ok(response)
            }
            Err(error) => {
                let mut status = Status::from(error);
                correlation::echo(status.metadata_mut(), &correlation_id);
                tally.code = Some(status.code());
                Err(status)
            }
        }
    }

    async fn admit_and_run<T, R, F, Fut>(
        &self,
        method: &'static str,
        request: GrpcRequest<T>,
        handler: F,
        correlation_id: String,
    ) -> Result<R, ApiError>
    where
        F: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, ApiError>>,
    {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.metrics.rpc_shed.inc();
            tracing::warn!(max_in_flight = self.max_in_flight, "shed: at the concurrency limit");
            return Err(ApiError::Overloaded { max_in_flight: self.max_in_flight });
        };
        let deadline_ms =
            grpc_timeout_ms(request.metadata()).map_or(self.request_timeout_ms, |ms| ms.min(self.request_timeout_ms));
        let outcome = async {
            let caller = self.authenticator.authenticate(request.metadata())?;
            tracing::Span::current().record("caller", caller.service());
            caller.require_operation(method)?;
            let context = correlation::context_of(
                request.metadata(),
                correlation_id,
                Some(caller.service().to_owned()),
                request.remote_addr(),
            );
            let handled = handler(request.into_inner());
            tokio::time::timeout(
                Duration::from_millis(deadline_ms),
                auth::scope(caller, correlation::scope(context, handled)),
            )
            .await
            .map_err(|_| ApiError::DeadlineExceeded { deadline_ms })?
        }
        .await;
        match &outcome {
            Ok(_) => tracing::debug!("ok"),
            Err(error) => tracing::info!(%error, "refused"),
        }
        outcome
    }
}

/// Records one RPC in the metrics when it ends: with its answer's code, or CANCELLED if the
/// handler was dropped unanswered (the caller went away or its own deadline fired first).
struct RpcTally<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    started: Instant,
    code: Option<Code>,
}

impl Drop for RpcTally<'_> {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::Cancelled);
        self.metrics.rpc_requests.get_or_create(&RpcLabels { method: self.method, code: code_name(code) }).inc();
        self.metrics
            .rpc_latency_seconds
            .get_or_create(&MethodLabels { method: self.method })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// The caller's deadline from `grpc-timeout` (up to 8 digits and a unit: H, M, S, m, u, n), in
/// whole milliseconds rounded up; `None` if absent or malformed (the server's limit applies).
fn grpc_timeout_ms(metadata: &tonic::metadata::MetadataMap) -> Option<u64> {
    let value = metadata.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    let nanos_per_unit: u64 = match unit {
        "H" => 3_600_000_000_000,
        "M" => 60_000_000_000,
        "S" => 1_000_000_000,
        "m" => 1_000_000,
        "u" => 1_000,
        "n" => 1,
        _ => return None,
    };
    Some(amount.saturating_mul(nanos_per_unit).div_ceil(1_000_000))
}

/// The canonical name of a gRPC status code, as a metrics label.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::{MetadataMap, MetadataValue};

    fn timeout(value: &'static str) -> Option<u64> {
        let mut metadata = MetadataMap::new();
        metadata.insert(GRPC_TIMEOUT, MetadataValue::from_static(value));
        grpc_timeout_ms(&metadata)
    }

    #[test]
    fn grpc_timeouts_parse_to_milliseconds() {
        assert_eq!(timeout("250m"), Some(250));
        assert_eq!(timeout("2S"), Some(2_000));
        assert_eq!(timeout("1H"), Some(3_600_000));
        assert_eq!(timeout("1500u"), Some(2));
        assert_eq!(timeout("1n"), Some(1));
        for malformed in ["", "m", "123456789m", "10x", "-5m", "5"] {
            assert_eq!(timeout(malformed), None, "{malformed}");
        }
        assert_eq!(grpc_timeout_ms(&MetadataMap::new()), None);
    }
}
