//! The audit trail: the append-only audit log (every mutating request: what changed and who
//! asked) and the data-access log (every read of personal data: who, whose, which fields, why),
//! both in PostgreSQL's `audit` schema, partitioned by UTC month.
//!
//! Directory changes write their audit row in the same transaction as the change ([`record`]).
//! The ledger's money requests are audited by the journal itself: each request's journal record
//! holds its operation, outcome, effects and request context, and the view `audit.ledger_requests`
//! presents it in the audit log's shape (a second copy per batch cost several times the journal
//! rows; see migrations/20261124000008_ledger_audit_view.sql). `audit.trail` unions both.
//! States written here never hold personal data in plaintext: directory states are the
//! non-personal columns plus the names of the encrypted fields that changed.
//!
//! - [`partitions`]: monthly partitions created ahead, next to the journal's.
//! - [`retention`]: old partitions moved to the `archive` schema, and dropped after 7 years.

pub mod partitions;
pub mod retention;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::engine::record::RequestContext;

/// One change to record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent<'a> {
    /// What happened, e.g. `user.registered`, `ledger.deposit`.
    pub event_type: &'a str,
    /// What it happened to, e.g. `user`, `wallet`, `ledger_account`.
    pub entity_type: &'a str,
    pub entity_id: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

/// The IP address of a peer recorded as `ip:port` (the port says nothing about who asked).
pub fn ip_of(peer: Option<&str>) -> Option<String> {
    let peer = peer?;
    Some(peer.parse::<std::net::SocketAddr>().map_or_else(|_| peer.to_owned(), |address| address.ip().to_string()))
}

/// Writes one audit row, on the connection (or transaction) making the change.
pub async fn record(
    conn: &mut PgConnection,
    event: &AuditEvent<'_>,
    context: Option<&RequestContext>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit.audit_log (event_type, entity_type, entity_id, before_state, after_state, caller,
             ip_address, user_agent, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(event.event_type)
    .bind(event.entity_type)
    .bind(&event.entity_id)
    .bind(&event.before)
    .bind(&event.after)
    .bind(context.and_then(|context| context.caller.as_deref()))
    .bind(ip_of(context.and_then(|context| context.peer.as_deref())))
    .bind(context.and_then(|context| context.user_agent.as_deref()))
    .bind(context.map(|context| context.correlation_id.as_str()))
    .execute(conn)
    .await?;
    Ok(())
}

/// One read of personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataAccess<'a> {
    /// Whose data was read; `None` for a lookup that found no one.
    pub subject_user_id: Option<Uuid>,
    pub entity_type: &'a str,
    pub fields: Vec<&'a str>,
    pub reason: &'a str,
}

/// Writes one data-access row.
pub async fn record_access(
    conn: &mut PgConnection,
    access: &DataAccess<'_>,
    context: Option<&RequestContext>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit.data_access_log (subject_user_id, entity_type, fields, reason, caller, ip_address,
             user_agent, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(access.subject_user_id)
    .bind(access.entity_type)
    .bind(&access.fields)
    .bind(access.reason)
    .bind(context.and_then(|context| context.caller.as_deref()))
    .bind(ip_of(context.and_then(|context| context.peer.as_deref())))
    .bind(context.and_then(|context| context.user_agent.as_deref()))
    .bind(context.map(|context| context.correlation_id.as_str()))
    .execute(conn)
    .await?;
    Ok(())
}
