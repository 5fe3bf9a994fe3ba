//! The transaction lifecycle: the one table of legal status changes, the compliance gate, and
//! the money movement each status implies.
//!
//! Funds: leaving Validating opens a reservation (id = transaction id) of principal + fees on
//! the paying user account; Completed closes it and posts the principal to the payee and each
//! fee to its fee-revenue account (money arriving from outside has nothing to reserve: the payer
//! system account pays the user principal - fees and fee revenue the fees); Failed before
//! completion releases the reservation; Compensated, after Completed -> Compensating, posts the
//! exact reverse of the completion postings. History is never edited: every change is an effect.
//! An illegal change is refused (`IllegalTransition`) and changes nothing.

use uuid::Uuid;

use super::account::{AccountRef, SystemKind, UserAccount};
use super::effect::{Effect, Slot, StatusChange};
use super::error::EngineError;
use super::money::{Amount, MAX_AMOUNT_MINOR};
use super::operation::{MAX_RESERVATION_TTL_MS, MAX_UNFINISHED_TRANSACTIONS_PER_USER, Receipt};
use super::reservation::ReservationStatus;
use super::rules::{self, ReservationHolder, Tx};
use super::transaction::{
    AmlResult, AmlStatus, ComplianceRecord, FeeLine, Fill, KycStatus, MAX_DETAILS, MAX_FEE_LINES, MAX_TEXT_LEN,
    NewTransaction, ProviderRef, RiskLevel, Transaction, TxStatus, TxType,
};

/// The legal status changes: from each status, where it may go. Providers may skip the
/// intermediate provider states (a confirmation can be the first thing they report).
pub const TRANSITIONS: [(TxStatus, &[TxStatus]); 10] = {
    use TxStatus::*;
    [
        (Initiated, &[Validating, Failed]),
        (Validating, &[BalanceReserved, Failed]),
        (BalanceReserved, &[SentToProvider, Failed]),
        (SentToProvider, &[ProviderProcessing, ProviderConfirming, Completed, Failed]),
        (ProviderProcessing, &[ProviderConfirming, Completed, Failed]),
        (ProviderConfirming, &[Completed, Failed]),
        (Completed, &[Compensating]),
        (Failed, &[]),
        (Compensating, &[Compensated]),
        (Compensated, &[]),
    ]
};

pub fn is_legal(from: TxStatus, to: TxStatus) -> bool {
    TRANSITIONS.iter().any(|(source, targets)| *source == from && targets.contains(&to))
}

/// Risk score at or above which a transaction is held for AML review (it still passes).
pub const AML_REVIEW_SCORE: u8 = 70;

/// What one status change asks for.
pub(crate) struct Change<'o> {
    pub to: TxStatus,
    pub reason: &'o str,
    pub provider_event: Option<&'o ProviderRef>,
    pub fill: Option<&'o Fill>,
}

fn invalid(reason: &str) -> EngineError {
    EngineError::InvalidTransaction { reason: reason.to_owned() }
}

/// Text the journal can store: at most `MAX_TEXT_LEN` bytes, and no NUL character, which
/// PostgreSQL's `text` and `jsonb` refuse. Refused here, a NUL is one request's error; journaled,
/// it failed the writer's whole batch and stopped the ledger until it reloaded (session 22).
fn storable_text(text: &str) -> bool {
    text.len() <= MAX_TEXT_LEN && !text.contains('\0')
}

fn check_shape(spec: &NewTransaction) -> Result<(), EngineError> {
    if !spec.kind.allowed_in(spec.domain) {
        return Err(invalid("the type does not belong to the domain"));
    }
    if spec.principal_minor <= 0 || spec.principal_minor > MAX_AMOUNT_MINOR {
        return Err(invalid("the principal must be positive and at most the maximum amount"));
    }
    // One line per tier: the journal's fee table is keyed by (transaction, tier), so a second
    // line of a tier would stop the journal writer, not just this request.
    let repeated_tier =
        |(index, line): (usize, &FeeLine)| spec.fees[..index].iter().any(|earlier| earlier.tier == line.tier);
    if spec.fees.len() > MAX_FEE_LINES
        || spec.fees.iter().any(|line| !(0..=MAX_AMOUNT_MINOR).contains(&line.amount_minor))
        || spec.fees.iter().enumerate().any(repeated_tier)
    {
        return Err(invalid("fees must be at most one line per tier, each from zero to the maximum amount"));
    }
    // A trade without the leg of what it buys would take the principal and deliver nothing.
    if spec.kind.is_trade() != spec.receive.is_some() {
        return Err(invalid("a trade needs the leg of the asset it buys, and only a trade has one"));
    }
    if spec.reserve_minor() > MAX_AMOUNT_MINOR {
        return Err(invalid("principal plus fees exceed the maximum amount"));
    }
    if spec.payer.asset() != spec.payee.asset() {
        return Err(EngineError::AssetMismatch { left: spec.payer.asset(), right: spec.payee.asset() });
    }
    if spec.payer == spec.payee {
        return Err(EngineError::SameAccount);
    }
    match (spec.payer, spec.payee) {
        (AccountRef::User(payer), _) if payer.user_id != spec.user_id => {
            return Err(invalid("the paying account must belong to the transaction's user"));
        }
        (AccountRef::System(_), AccountRef::User(payee)) => {
            if payee.user_id != spec.user_id {
                return Err(invalid("money from outside must arrive in the transaction's user account"));
            }
            if spec.fees_total_minor() >= spec.principal_minor {
                return Err(invalid("fees on arriving money must be less than the amount"));
            }
        }
        (AccountRef::System(_), AccountRef::System(_)) => {
            return Err(invalid("a transaction needs a user account on one side"));
        }
        _ => {}
    }
    if let Some((from, to)) = spec.receive {
        if to.user_id != spec.user_id {
            return Err(invalid("the bought asset must arrive in the transaction's user account"));
        }
        // The API builds this leg; the engine still refuses one that would post between assets.
        if from.kind != SystemKind::ExchangeLiquidity || from.asset != to.asset {
            return Err(invalid("the bought asset must come from its own exchange liquidity account"));
        }
    }
    let unstorable = |text: &str| !storable_text(text);
    if spec.details.len() > MAX_DETAILS
        || spec.details.iter().any(|(key, value)| unstorable(key) || unstorable(value))
        || spec.provider.as_deref().is_some_and(unstorable)
        || spec.fees.iter().any(|line| unstorable(&line.category) || line.provider.as_deref().is_some_and(unstorable))
    {
        return Err(invalid("too many details, or a detail or provider too long or holding a NUL character"));
    }
    Ok(())
}

pub(crate) fn initiate(tx: &mut Tx<'_, '_>, spec: &NewTransaction) -> Result<Receipt, EngineError> {
    check_shape(spec)?;
    for side in [spec.payer, spec.payee] {
        if let AccountRef::User(account) = side {
            tx.account(&account)?;
        }
    }
    if let Some((_, to)) = spec.receive {
        tx.account(&to)?;
    }
    if find(tx, spec.user_id, spec.id).is_some() {
        return Err(EngineError::TransactionAlreadyExists { transaction_id: spec.id });
    }
    if unfinished_transactions(tx, spec.user_id) >= MAX_UNFINISHED_TRANSACTIONS_PER_USER {
        return Err(EngineError::TooManyUnfinishedTransactions {
            user_id: spec.user_id,
            max: MAX_UNFINISHED_TRANSACTIONS_PER_USER,
        });
    }
    // The transaction's reservation will take its id: it must be free.
    if tx.reservation(spec.user_id, spec.id).is_some() {
        return Err(EngineError::ReservationAlreadyExists { user_id: spec.user_id, reservation_id: spec.id });
    }
    tx.emit(Effect::TransactionCreated {
        transaction: Box::new(Transaction {
            spec: spec.clone(),
            status: TxStatus::Initiated,
            created_at_ms: tx.now_ms,
            updated_at_ms: tx.now_ms,
            aml: None,
            fill: None,
        }),
    });
    Ok(Receipt::Transaction { status: TxStatus::Initiated })
}

fn find(tx: &mut Tx<'_, '_>, user_id: Uuid, transaction_id: Uuid) -> Option<Transaction> {
    tx.shards
        .get(tx.map.of_user(user_id))
        .users
        .get(&user_id)
        .and_then(|user| user.transactions.get(&transaction_id))
        .cloned()
}

fn unfinished_transactions(tx: &mut Tx<'_, '_>, user_id: Uuid) -> usize {
    tx.shards.get(tx.map.of_user(user_id)).users.get(&user_id).map_or(0, |user| user.unfinished_transactions)
}

fn compliance(tx: &mut Tx<'_, '_>, user_id: Uuid) -> Option<ComplianceRecord> {
    tx.shards.get(tx.map.of_user(user_id)).users.get(&user_id).and_then(|user| user.compliance)
}

/// The compliance gate: whether the user may make this transaction, and the AML verdict.
pub fn assess(record: Option<ComplianceRecord>, spec: &NewTransaction) -> Result<AmlResult, String> {
    let Some(record) = record else { return Err("no compliance record for the user (KYC not started)".into()) };
    let kyc_allows = match record.kyc {
        KycStatus::Verified => true,
        // Money may arrive while verification is pending; nothing may leave.
        KycStatus::Pending => spec.kind == TxType::AddMoney,
        KycStatus::NotStarted | KycStatus::Rejected => false,
    };
    if !kyc_allows {
        return Err(format!("KYC status {} does not allow {}", record.kyc.name(), spec.kind.name()));
    }
    if let Some(max_minor) = record.max_transaction_minor
        && spec.principal_minor > max_minor
    {
        return Err(format!("amount {} exceeds the user's per-transaction limit {max_minor}", spec.principal_minor));
    }
    let (risk_score, mut flags) = match record.risk {
        RiskLevel::Low => (10, Vec::new()),
        RiskLevel::Medium => (40, Vec::new()),
        RiskLevel::High => (AML_REVIEW_SCORE, vec!["high_risk_user".to_owned()]),
    };
    if record.kyc == KycStatus::Pending {
        flags.push("kyc_pending".to_owned());
    }
    let status = if risk_score >= AML_REVIEW_SCORE { AmlStatus::Review } else { AmlStatus::Cleared };
    Ok(AmlResult { status, risk_score, flags })
}

pub(crate) fn transition(
    tx: &mut Tx<'_, '_>,
    user_id: Uuid,
    transaction_id: Uuid,
    payee_user_id: Option<Uuid>,
    change: Change<'_>,
) -> Result<Receipt, EngineError> {
    let event_storable = |event: &ProviderRef| storable_text(&event.source) && storable_text(&event.event_id);
    if !storable_text(change.reason) || change.provider_event.is_some_and(|event| !event_storable(event)) {
        return Err(invalid("the reason or the provider event is too long or holds a NUL character"));
    }
    let transaction =
        find(tx, user_id, transaction_id).ok_or(EngineError::TransactionNotFound { user_id, transaction_id })?;
    let from = transaction.status;
    if !is_legal(from, change.to) {
        return Err(EngineError::IllegalTransition { transaction_id, from, to: change.to });
    }
    let other_payee = match transaction.spec.payee {
        AccountRef::User(payee) if payee.user_id != user_id => Some(payee.user_id),
        _ => None,
    };
    if other_payee.is_some() && payee_user_id != other_payee {
        return Err(EngineError::PayeeMismatch);
    }
    let spec = &transaction.spec;
    let mut record = StatusChange {
        user_id,
        transaction_id,
        kind: spec.kind,
        domain: spec.domain,
        from,
        to: change.to,
        reason: change.reason.to_owned(),
        at_ms: tx.now_ms,
        previous_updated_at_ms: transaction.updated_at_ms,
        provider_event: change.provider_event.cloned(),
        aml: None,
        fill: None,
        fees_posted: Vec::new(),
    };
    match change.to {
        TxStatus::BalanceReserved => match assess(compliance(tx, user_id), spec) {
            Ok(aml) => {
                if let Some(account) = spec.paying_account() {
                    let amount = Amount::from_minor(spec.reserve_minor())
                        .map_err(|_| invalid("principal plus fees is not a valid amount"))?;
                    rules::reserve(
                        tx,
                        ReservationHolder::Transaction,
                        transaction_id,
                        &account,
                        amount,
                        Some(MAX_RESERVATION_TTL_MS),
                    )?;
                }
                record.aml = Some(aml);
            }
            Err(reason) => {
                // The gate's refusal is an outcome, not an error: the transaction ends Failed with
                // the verdict recorded, so the history shows why.
                record.to = TxStatus::Failed;
                record.reason = format!("compliance: {reason}");
                record.aml = Some(AmlResult {
                    status: AmlStatus::Rejected,
                    risk_score: 100,
                    flags: vec!["compliance_gate".to_owned()],
                });
            }
        },
        TxStatus::SentToProvider => {
            // From here the provider may pay the money out, and the reservation stops expiring
            // (`effect::hold_at_provider`): it must still hold the funds now. This is the last
            // point where the ledger decides whether money leaves, so a freeze stops it here.
            if let Some(account) = spec.paying_account() {
                let reservation = rules::active_reservation(tx, account.user_id, transaction_id)?;
                if tx.now_ms >= reservation.expires_at_ms {
                    return Err(EngineError::ReservationExpired {
                        reservation_id: transaction_id,
                        expires_at_ms: reservation.expires_at_ms,
                    });
                }
                if tx.account(&account)?.config.frozen {
                    return Err(EngineError::AccountFrozen { account });
                }
            }
        }
        TxStatus::Completed => {
            let fill = complete(tx, spec, change.fill)?;
            record.fill = fill;
            record.fees_posted = spec.fees.iter().filter(|line| line.amount_minor > 0).cloned().collect();
        }
        TxStatus::Failed => {
            if let Some(account) = spec.paying_account()
                && let Some(reservation) = tx.reservation(account.user_id, transaction_id)
                && reservation.status == ReservationStatus::Active
            {
                rules::close_and_refund(tx, &reservation, ReservationStatus::Released)?;
            }
        }
        TxStatus::Compensated => {
            compensate(tx, &transaction)?;
            record.fees_posted = spec.fees.iter().filter(|line| line.amount_minor > 0).cloned().collect();
        }
        _ => {}
    }
    let status = record.to;
    tx.emit(Effect::TransactionStatusChanged { change: Box::new(record) });
    Ok(Receipt::Transaction { status })
}

fn fee_slot(tx: &Tx<'_, '_>, line: &FeeLine, user_side: &UserAccount) -> Slot {
    tx.system_slot(SystemKind::FeeRevenue(line.tier), user_side)
}

/// The completion postings. Returns the fill recorded (trades only).
fn complete(tx: &mut Tx<'_, '_>, spec: &NewTransaction, fill: Option<&Fill>) -> Result<Option<Fill>, EngineError> {
    let fill = match (spec.receive, fill) {
        (Some(_), None) => return Err(EngineError::FillRequired),
        (Some(_), Some(fill)) if fill.quantity_minor <= 0 || fill.quantity_minor > MAX_AMOUNT_MINOR => {
            return Err(invalid("the fill quantity must be positive and at most the maximum amount"));
        }
        (Some(_), Some(fill)) => Some(fill.clone()),
        (None, _) => None,
    };
    match spec.payer {
        AccountRef::User(account) => {
            // Completion comes only from a status with the provider, where the reservation no
            // longer expires: it is Active whatever its nominal expiry says.
            let reservation = rules::active_reservation(tx, account.user_id, spec.id)?;
            debug_assert_eq!(reservation.amount_minor, spec.reserve_minor());
            // No frozen check: the provider has the money already (a freeze after sending cannot
            // call it back), and refusing to record that would leave the books short of a payout
            // that happened, with a failure (releasing the funds) as the only way out.
            let payee = tx.slot(spec.payee, tx.map.of_user(account.user_id));
            tx.check_credit(payee, spec.principal_minor)?;
            tx.emit(Effect::ReservationClosed {
                user_id: account.user_id,
                reservation_id: spec.id,
                status: ReservationStatus::Completed,
                closed_at_ms: tx.now_ms,
            });
            // Checked and counted against the limits when reserved: moves without a second check.
            tx.emit(Effect::Posting { from: Slot::User(account), to: payee, amount_minor: spec.principal_minor });
            for line in spec.fees.iter().filter(|line| line.amount_minor > 0) {
                let revenue = fee_slot(tx, line, &account);
                tx.check_credit(revenue, line.amount_minor)?;
                tx.emit(Effect::Posting { from: Slot::User(account), to: revenue, amount_minor: line.amount_minor });
            }
        }
        AccountRef::System(_) => {
            let AccountRef::User(account) = spec.payee else { return Err(invalid("no user account to credit")) };
            let payer = tx.slot(spec.payer, tx.map.of_user(account.user_id));
            tx.post(payer, Slot::User(account), spec.principal_minor - spec.fees_total_minor())?;
            for line in spec.fees.iter().filter(|line| line.amount_minor > 0) {
                let revenue = fee_slot(tx, line, &account);
                tx.post(payer, revenue, line.amount_minor)?;
            }
        }
    }
    if let (Some((source, to)), Some(fill)) = (spec.receive, &fill) {
        let from = tx.slot(AccountRef::System(source), tx.map.of_user(to.user_id));
        tx.post(from, Slot::User(to), fill.quantity_minor)?;
    }
    Ok(fill)
}

/// The reverse of every completion posting, as new postings.
fn compensate(tx: &mut Tx<'_, '_>, transaction: &Transaction) -> Result<(), EngineError> {
    let spec = &transaction.spec;
    if let (Some((source, to)), Some(fill)) = (spec.receive, &transaction.fill) {
        let back = tx.slot(AccountRef::System(source), tx.map.of_user(to.user_id));
        tx.post_reversal(Slot::User(to), back, fill.quantity_minor)?;
    }
    let user_side = match (spec.payer, spec.payee) {
        (AccountRef::User(account), _) | (_, AccountRef::User(account)) => account,
        (AccountRef::System(_), AccountRef::System(_)) => return Err(invalid("no user account on either side")),
    };
    let shard = tx.map.of_user(user_side.user_id);
    let (payer, payee) = (tx.slot(spec.payer, shard), tx.slot(spec.payee, shard));
    let principal_back_minor = match spec.payer {
        AccountRef::User(_) => spec.principal_minor,
        AccountRef::System(_) => spec.principal_minor - spec.fees_total_minor(),
    };
    tx.post_reversal(payee, payer, principal_back_minor)?;
    for line in spec.fees.iter().filter(|line| line.amount_minor > 0) {
        let revenue = fee_slot(tx, line, &user_side);
        tx.post_reversal(revenue, payer, line.amount_minor)?;
    }
    Ok(())
}

pub(crate) fn set_compliance(
    tx: &mut Tx<'_, '_>,
    user_id: Uuid,
    record: ComplianceRecord,
) -> Result<Receipt, EngineError> {
    if record.max_transaction_minor.is_some_and(|max_minor| !(0..=MAX_AMOUNT_MINOR).contains(&max_minor)) {
        return Err(invalid("the per-transaction limit must be between 0 and the maximum amount"));
    }
    let before = compliance(tx, user_id);
    if before != Some(record) {
        tx.emit(Effect::ComplianceSet { user_id, before, after: record });
    }
    Ok(Receipt::Done)
}

/// Sets the KYC status and risk level, keeping the per-transaction limit the user's record has.
pub(crate) fn set_kyc(
    tx: &mut Tx<'_, '_>,
    user_id: Uuid,
    kyc: KycStatus,
    risk: RiskLevel,
) -> Result<Receipt, EngineError> {
    let max_transaction_minor = compliance(tx, user_id).and_then(|record| record.max_transaction_minor);
    set_compliance(tx, user_id, ComplianceRecord { kyc, risk, max_transaction_minor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_one_row_and_finished_ones_only_lead_to_compensation() {
        for status in TxStatus::ALL {
            assert_eq!(TRANSITIONS.iter().filter(|(from, _)| *from == status).count(), 1, "{status:?}");
        }
        for (from, targets) in TRANSITIONS {
            assert!(!targets.contains(&from), "{from:?} may not stay put");
            if matches!(from, TxStatus::Failed | TxStatus::Compensated) {
                assert!(targets.is_empty());
            }
        }
        assert!(is_legal(TxStatus::Completed, TxStatus::Compensating));
        assert!(!is_legal(TxStatus::Completed, TxStatus::Failed));
    }
}
