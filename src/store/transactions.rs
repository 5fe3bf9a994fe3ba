//! Recovery of the transaction state: the transactions and user compliance records the engine
//! holds, read back from the projections `journal::transactions` writes.
//!
//! Called by `load::read_state` inside its REPEATABLE READ snapshot. Unfinished transactions
//! are always loaded; finished ones only if they finished after `cutoff_ms` (the engine forgets
//! them after the retention window, see `Engine::sweep`).

use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::StoreError;
use crate::engine::state::EngineState;
use crate::engine::transaction::{
    AmlResult, AmlStatus, ComplianceRecord, Fill, KycStatus, NewTransaction, RiskLevel, Transaction, TxStatus,
};

type TransactionRow =
    (String, String, i64, i64, Option<String>, Option<i16>, Option<Vec<String>>, Option<Decimal>, Option<Decimal>);

fn corrupt(what: String) -> StoreError {
    StoreError::Corrupt(what)
}

fn whole_minor(value: Decimal, what: &str) -> Result<i128, StoreError> {
    if value.fract() != Decimal::ZERO {
        return Err(corrupt(format!("{what} {value} is not a whole number of minor units")));
    }
    value.mantissa().checked_div(10_i128.pow(value.scale())).ok_or_else(|| corrupt(format!("{what} {value}")))
}

/// Adds the transactions and compliance records of the snapshot to `state`.
pub(super) async fn read(tx: &mut PgConnection, cutoff_ms: i64, state: &mut EngineState) -> Result<(), StoreError> {
    let rows: Vec<TransactionRow> = sqlx::query_as(
        "SELECT spec::text, status, created_at_ms, updated_at_ms, aml_status, aml_risk_score, aml_flags, fill_price,
                fill_quantity_minor
         FROM ledger.transactions
         WHERE status NOT IN ('completed', 'failed', 'compensated') OR updated_at_ms > $1",
    )
    .bind(cutoff_ms)
    .fetch_all(&mut *tx)
    .await?;
    for (spec, status, created_at_ms, updated_at_ms, aml_status, aml_score, aml_flags, fill_price, fill_quantity) in
        rows
    {
        let spec: NewTransaction = serde_json::from_str(&spec)
            .map_err(|error| corrupt(format!("a transaction spec does not parse: {error}")))?;
        let id = spec.id;
        let status =
            TxStatus::from_name(&status).ok_or_else(|| corrupt(format!("transaction {id}: status {status}")))?;
        let aml = match (aml_status, aml_score) {
            (Some(aml_status), Some(score)) => Some(AmlResult {
                status: match aml_status.as_str() {
                    "cleared" => AmlStatus::Cleared,
                    "review" => AmlStatus::Review,
                    "rejected" => AmlStatus::Rejected,
                    other => return Err(corrupt(format!("transaction {id}: AML status {other}"))),
                },
                risk_score: u8::try_from(score)
                    .map_err(|_| corrupt(format!("transaction {id}: risk score {score}")))?,
                flags: aml_flags.unwrap_or_default(),
            }),
            (None, None) => None,
            _ => return Err(corrupt(format!("transaction {id}: AML status and score disagree"))),
        };
        let fill = match (fill_price, fill_quantity) {
            (Some(price), Some(quantity)) => {
                Some(Fill { price, quantity_minor: whole_minor(quantity, "fill quantity")? })
            }
            (None, None) => None,
            _ => return Err(corrupt(format!("transaction {id}: fill price and quantity disagree"))),
        };
        let user_id = spec.user_id;
        state.transactions.insert((user_id, id), Transaction { spec, status, created_at_ms, updated_at_ms, aml, fill });
    }

    let records: Vec<(Uuid, String, String, Option<Decimal>)> =
        sqlx::query_as("SELECT user_id, kyc_status, risk_level, max_transaction_minor FROM ledger.user_compliance")
            .fetch_all(&mut *tx)
            .await?;
    for (user_id, kyc, risk, cap) in records {
        let kyc = KycStatus::ALL
            .into_iter()
            .find(|status| status.name() == kyc)
            .ok_or_else(|| corrupt(format!("user {user_id}: KYC status {kyc}")))?;
        let risk = RiskLevel::ALL
            .into_iter()
            .find(|level| level.name() == risk)
            .ok_or_else(|| corrupt(format!("user {user_id}: risk level {risk}")))?;
        let max_transaction_minor = cap.map(|cap| whole_minor(cap, "per-transaction cap")).transpose()?;
        state.compliance.insert(user_id, ComplianceRecord { kyc, risk, max_transaction_minor });
    }
    Ok(())
}
