//! What a provider event means: the one table from provider event types to the status they move
//! a transaction to, and how the transaction reference and a trade's fill are read from the
//! payload. Pure; `api::transactions` stores the event and applies it.

use rust_decimal::Decimal;
use serde_json::Value;
use uuid::Uuid;

use crate::engine::transaction::TxStatus;

/// Event types (as providers name them, and a generic `provider.*` family for the edge to use)
/// and the status each moves its transaction to. Anything else is stored and Ignored.
pub const EVENT_TYPES: [(&str, TxStatus); 12] = [
    ("provider.processing", TxStatus::ProviderProcessing),
    ("provider.confirming", TxStatus::ProviderConfirming),
    ("provider.succeeded", TxStatus::Completed),
    ("provider.failed", TxStatus::Failed),
    ("provider.reversed", TxStatus::Compensating),
    ("payment_intent.processing", TxStatus::ProviderProcessing),
    ("payment_intent.succeeded", TxStatus::Completed),
    ("payment_intent.payment_failed", TxStatus::Failed),
    ("charge.dispute.created", TxStatus::Compensating),
    ("transaction_updated.pending", TxStatus::ProviderProcessing),
    ("transaction_updated.completed", TxStatus::Completed),
    ("transaction_updated.failed", TxStatus::Failed),
];

pub fn target_status(event_type: &str) -> Option<TxStatus> {
    EVENT_TYPES.iter().find(|(name, _)| *name == event_type).map(|(_, status)| *status)
}

/// What the payload says, once parsed: the processed form stored beside the raw one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Parsed {
    pub transaction_id: Uuid,
    /// Decimal text of the fill, for trades; validated against the bought asset later.
    pub price: Option<String>,
    pub quantity: Option<String>,
}

/// Reads `transaction_id` (or `metadata.transaction_id`, as Stripe nests it) and, for trades,
/// `price` and `quantity` from a JSON payload.
pub fn parse(raw_payload: &str) -> Result<Parsed, &'static str> {
    let value: Value = serde_json::from_str(raw_payload).map_err(|_| "the payload is not JSON")?;
    let reference = value
        .get("transaction_id")
        .or_else(|| value.get("metadata").and_then(|metadata| metadata.get("transaction_id")))
        .and_then(Value::as_str)
        .ok_or("the payload names no transaction_id")?;
    let transaction_id = Uuid::try_parse(reference).map_err(|_| "the payload's transaction_id is not a UUID")?;
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    let (price, quantity) = (text("price"), text("quantity"));
    // The parsed form is stored as `jsonb`, which holds no NUL; the price is checked below.
    if quantity.as_deref().is_some_and(|quantity| quantity.contains('\0')) {
        return Err("the payload's quantity holds a NUL character");
    }
    if let Some(price) = &price
        && price.parse::<Decimal>().is_err()
    {
        return Err("the payload's price is not a decimal");
    }
    Ok(Parsed { transaction_id, price, quantity })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_map_to_statuses_and_payloads_name_their_transaction() {
        assert_eq!(target_status("payment_intent.succeeded"), Some(TxStatus::Completed));
        assert_eq!(target_status("customer.created"), None);
        let id = Uuid::from_u128(7);
        let parsed = parse(&format!(r#"{{"metadata":{{"transaction_id":"{id}"}}}}"#)).unwrap();
        assert_eq!(parsed.transaction_id, id);
        assert!(parse("not json").is_err());
        assert!(parse(r#"{"transaction_id":"nope"}"#).is_err());
        let trade = parse(&format!(r#"{{"transaction_id":"{id}","price":"60000.5","quantity":"0.0002"}}"#)).unwrap();
        assert_eq!(trade.quantity.as_deref(), Some("0.0002"));
        let nul = parse(&format!(r#"{{"transaction_id":"{id}","quantity":"1\u0000"}}"#));
        assert_eq!(nul, Err("the payload's quantity holds a NUL character"));
    }
}
