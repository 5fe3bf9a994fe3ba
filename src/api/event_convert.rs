//! Wire <-> domain conversion for the Events service: the stream request's start and filters
//! (checked here, once), and stored events to their wire form.

use super::convert::InvalidField;
use super::pb;
use crate::outbox::read::{EventFilter, StoredEvent};

/// The most names one filter list may hold.
pub const MAX_FILTER_NAMES: usize = 32;
/// The longest name in a filter.
const MAX_FILTER_NAME_LEN: usize = 64;

/// Where a stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    AfterPosition(i64),
    Now,
}

pub fn stream_request(request: &pb::StreamEventsRequest) -> Result<(Start, EventFilter), InvalidField> {
    let start = match request.start {
        None => Start::AfterPosition(0),
        Some(pb::stream_events_request::Start::AfterPosition(position)) if position >= 0 => {
            Start::AfterPosition(position)
        }
        Some(pb::stream_events_request::Start::AfterPosition(_)) => {
            return Err(invalid("after_position", "must not be negative"));
        }
        Some(pb::stream_events_request::Start::FromNow(true)) => Start::Now,
        Some(pb::stream_events_request::Start::FromNow(false)) => {
            return Err(invalid("from_now", "must be true when set (or set after_position instead)"));
        }
    };
    let filter = EventFilter {
        aggregate_types: names(&request.aggregate_types, "aggregate_types")?,
        event_types: names(&request.event_types, "event_types")?,
    };
    Ok((start, filter))
}

fn names(values: &[String], field: &str) -> Result<Vec<String>, InvalidField> {
    if values.len() > MAX_FILTER_NAMES {
        return Err(invalid(field, &format!("at most {MAX_FILTER_NAMES} names")));
    }
    for (index, value) in values.iter().enumerate() {
        let usable = !value.is_empty()
            && value.len() <= MAX_FILTER_NAME_LEN
            && value.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
        if !usable {
            return Err(invalid(
                &format!("{field}[{index}]"),
                &format!("1..{MAX_FILTER_NAME_LEN} characters of a-z, 0-9 and _"),
            ));
        }
    }
    Ok(values.to_vec())
}

fn invalid(field: &str, description: &str) -> InvalidField {
    InvalidField { field: field.to_owned(), description: description.to_owned() }
}

pub fn event(stored: StoredEvent) -> pb::Event {
    pb::Event {
        position: stored.position,
        event_id: stored.event_id.to_string(),
        sequence: u64::try_from(stored.sequence).unwrap_or_default(),
        aggregate_type: stored.aggregate_type,
        aggregate_id: stored.aggregate_id,
        event_type: stored.event_type,
        version: i32::from(stored.version),
        payload_json: stored.payload,
        metadata_json: stored.metadata,
        created_at_ms: stored.created_at.timestamp_millis(),
    }
}
