//! Wire <-> directory conversion for the `Directory` service: the only place its requests are
//! checked. Ids must be canonical UUIDs, enums known and not UNSPECIFIED, every string bounded,
//! personal values shaped as their field says (email, E.164-like phone, ISO date, country code),
//! wallet addresses valid for their chain and never a private key, and every read of personal
//! data must say why. A refusal names the field by its path, as `convert` does for the ledger.

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::convert::{self, InvalidField};
use super::pb;
use super::status::ApiError;
use crate::directory::address::{self, MAX_ADDRESS_LEN};
use crate::directory::model::{
    BankingKind, CheckResult, CheckType, ComplianceCheckRecord, DefiKind, ExperienceLevel, InvestingKind, KycStatus,
    KycUpdate, Mascot, NewComplianceCheck, NewDomainAccount, NewUser, NewWallet, PersonalField, PersonalValues,
    Preferences, RiskLevel, RiskTolerance, UserRecord, UserUpdate, Verification, date_of_birth,
};
use crate::engine::account::Domain;
use crate::engine::asset::{Asset, Chain};
use crate::engine::money::Amount;

/// The longest short text (names, provider, flags, time zone, kind...) accepted.
const MAX_TEXT_LEN: usize = 256;

/// The longest email accepted (RFC 5321's path limit).
const MAX_EMAIL_LEN: usize = 254;

/// The most list entries (flags, document references, domains) one request may carry.
const MAX_LIST_LEN: usize = 32;

/// The latest expiry a compliance check may carry: 9999-12-31 23:59:59.999 UTC.
const MAX_EXPIRES_AT_MS: i64 = 253_402_300_799_999;

fn invalid(field: &str, description: impl Into<String>) -> InvalidField {
    InvalidField { field: field.to_string(), description: description.into() }
}

pub fn user_id(text: &str, field: &str) -> Result<Uuid, InvalidField> {
    convert::uuid(text, field)
}

fn text(value: &str, field: &str) -> Result<String, InvalidField> {
    if value.trim().is_empty() {
        return Err(invalid(field, "is required"));
    }
    if value.len() > MAX_TEXT_LEN {
        return Err(invalid(field, format!("is longer than {MAX_TEXT_LEN} bytes")));
    }
    // No control characters: PostgreSQL stores no NUL, and a list is stored joined by newlines
    // (a document reference holding one came back as two; session 22).
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "holds a control character"));
    }
    Ok(value.to_string())
}

/// Why personal data is read: required, bounded.
pub fn reason(value: &str) -> Result<String, InvalidField> {
    text(value, "reason")
}

fn list(values: &[String], field: &str) -> Result<Vec<String>, InvalidField> {
    if values.len() > MAX_LIST_LEN {
        return Err(invalid(field, format!("holds more than {MAX_LIST_LEN} entries")));
    }
    values.iter().enumerate().map(|(index, value)| text(value, &format!("{field}[{index}]"))).collect()
}

pub fn email(value: &str, field: &str) -> Result<String, InvalidField> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if value.len() > MAX_EMAIL_LEN {
        return Err(invalid(field, format!("is longer than {MAX_EMAIL_LEN} bytes")));
    }
    let shaped = value.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
    });
    if !shaped || value.chars().any(|c| c.is_whitespace() || c.is_control()) || value.matches('@').count() != 1 {
        return Err(invalid(field, "is not an email address"));
    }
    Ok(value.to_string())
}

fn profile(profile: Option<&pb::Profile>, prefix: &str, today: NaiveDate) -> Result<PersonalValues, InvalidField> {
    let Some(profile) = profile else { return Ok(Vec::new()) };
    let mut values = Vec::new();
    let mut add = |field: PersonalField, value: &str, check: &dyn Fn(&str) -> bool, why: &str| {
        if value.is_empty() {
            return Ok(());
        }
        let path = format!("{prefix}.{}", field.name());
        let value = text(value, &path)?;
        if !check(&value) {
            return Err(invalid(&path, why));
        }
        values.push((field, value));
        Ok(())
    };
    let any = |_: &str| true;
    add(PersonalField::GivenName, &profile.given_name, &any, "")?;
    add(PersonalField::FamilyName, &profile.family_name, &any, "")?;
    let phone = |value: &str| {
        let digits = value.strip_prefix('+').unwrap_or("");
        (8..=15).contains(&digits.len()) && digits.bytes().all(|byte| byte.is_ascii_digit())
    };
    add(PersonalField::Phone, &profile.phone, &phone, "must be + and 8 to 15 digits (E.164)")?;
    let dob = |value: &str| date_of_birth(value, today).is_some();
    add(PersonalField::DateOfBirth, &profile.date_of_birth, &dob, "must be a past date YYYY-MM-DD after 1900")?;
    let country = |value: &str| value.len() == 2 && value.bytes().all(|byte| byte.is_ascii_uppercase());
    add(PersonalField::Nationality, &profile.nationality, &country, "must be an ISO 3166-1 alpha-2 code")?;
    Ok(values)
}

fn currency(value: &str, field: &str) -> Result<String, InvalidField> {
    if value.len() == 3 && value.bytes().all(|byte| byte.is_ascii_uppercase()) {
        Ok(value.to_string())
    } else {
        Err(invalid(field, "must be an ISO 4217 code, e.g. USD"))
    }
}

fn mascot(value: i32, field: &str) -> Result<Mascot, InvalidField> {
    match pb::Mascot::try_from(value) {
        Ok(pb::Mascot::Acqua) => Ok(Mascot::Acqua),
        Ok(pb::Mascot::Mystic) => Ok(Mascot::Mystic),
        Ok(pb::Mascot::Coral) => Ok(Mascot::Coral),
        _ => Err(invalid(field, "must be ACQUA, MYSTIC or CORAL")),
    }
}

fn experience(value: i32, field: &str) -> Result<ExperienceLevel, InvalidField> {
    match pb::ExperienceLevel::try_from(value) {
        Ok(pb::ExperienceLevel::Beginner) => Ok(ExperienceLevel::Beginner),
        Ok(pb::ExperienceLevel::Intermediate) => Ok(ExperienceLevel::Intermediate),
        Ok(pb::ExperienceLevel::Advanced) => Ok(ExperienceLevel::Advanced),
        _ => Err(invalid(field, "must be BEGINNER, INTERMEDIATE or ADVANCED")),
    }
}

pub fn register_user(request: &pb::RegisterUserRequest, today: NaiveDate) -> Result<NewUser, InvalidField> {
    let preferences = request.preferences.as_ref().ok_or_else(|| invalid("preferences", "is required"))?;
    Ok(NewUser {
        user_id: user_id(&request.user_id, "user_id")?,
        email: email(&request.email, "email")?,
        two_factor_enabled: request.two_factor_enabled,
        profile: profile(request.profile.as_ref(), "profile", today)?,
        preferences: Preferences {
            timezone: text(&preferences.timezone, "preferences.timezone")?,
            language: text(&preferences.language, "preferences.language")?,
            currency: currency(&preferences.currency, "preferences.currency")?,
        },
        mascot: mascot(request.mascot, "mascot")?,
        experience_level: experience(request.experience_level, "experience_level")?,
    })
}

pub fn update_user(request: &pb::UpdateUserRequest, today: NaiveDate) -> Result<(Uuid, UserUpdate), InvalidField> {
    let optional_text = |value: Option<&String>, field: &str| {
        value.filter(|value| !value.is_empty()).map(|value| text(value, field)).transpose()
    };
    let preferences = request.preferences.as_ref();
    let domains = if request.enabled_domains.is_empty() {
        None
    } else {
        let names = list(&request.enabled_domains, "enabled_domains")?;
        let parsed = names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                Domain::ALL
                    .into_iter()
                    .find(|domain| domain.name() == name)
                    .ok_or_else(|| invalid(&format!("enabled_domains[{index}]"), "must be banking, investing or defi"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Some(parsed)
    };
    if request.points.is_some_and(|points| points < 0) {
        return Err(invalid("points", "must not be negative"));
    }
    if request.streak_days.is_some_and(|days| days < 0) {
        return Err(invalid("streak_days", "must not be negative"));
    }
    let update = UserUpdate {
        email: request.email.as_deref().map(|value| email(value, "email")).transpose()?,
        two_factor_enabled: request.two_factor_enabled,
        profile: profile(request.profile.as_ref(), "profile", today)?,
        timezone: optional_text(preferences.map(|preferences| &preferences.timezone), "preferences.timezone")?,
        language: optional_text(preferences.map(|preferences| &preferences.language), "preferences.language")?,
        currency: preferences
            .map(|preferences| &preferences.currency)
            .filter(|value| !value.is_empty())
            .map(|value| currency(value, "preferences.currency"))
            .transpose()?,
        mascot: (request.mascot != 0).then(|| mascot(request.mascot, "mascot")).transpose()?,
        experience_level: (request.experience_level != 0)
            .then(|| experience(request.experience_level, "experience_level"))
            .transpose()?,
        points: request.points,
        streak_days: request.streak_days,
        enabled_domains: domains,
        touch_last_active: request.touch_last_active,
    };
    Ok((user_id(&request.user_id, "user_id")?, update))
}

pub fn set_kyc(request: &pb::SetKycRequest) -> Result<(Uuid, KycUpdate), InvalidField> {
    let status = match pb::KycStatus::try_from(request.status) {
        Ok(pb::KycStatus::NotStarted) => KycStatus::NotStarted,
        Ok(pb::KycStatus::Pending) => KycStatus::Pending,
        Ok(pb::KycStatus::Verified) => KycStatus::Verified,
        Ok(pb::KycStatus::Rejected) => KycStatus::Rejected,
        Ok(pb::KycStatus::Expired) => KycStatus::Expired,
        _ => return Err(invalid("status", "must be a known KYC status")),
    };
    let risk_level = match pb::RiskLevel::try_from(request.risk_level) {
        Ok(pb::RiskLevel::Unassessed) => RiskLevel::Unassessed,
        Ok(pb::RiskLevel::Low) => RiskLevel::Low,
        Ok(pb::RiskLevel::Medium) => RiskLevel::Medium,
        Ok(pb::RiskLevel::High) => RiskLevel::High,
        Ok(pb::RiskLevel::Prohibited) => RiskLevel::Prohibited,
        _ => return Err(invalid("risk_level", "must be a known risk level")),
    };
    let documents = list(&request.document_references, "document_references")?;
    Ok((
        user_id(&request.user_id, "user_id")?,
        KycUpdate {
            status,
            risk_level,
            compliance_flags: list(&request.compliance_flags, "compliance_flags")?,
            document_references: (!documents.is_empty()).then_some(documents),
        },
    ))
}

pub fn compliance_check(
    request: &pb::RecordComplianceCheckRequest,
) -> Result<(Uuid, NewComplianceCheck), InvalidField> {
    let check_type = match pb::ComplianceCheckType::try_from(request.check_type) {
        Ok(pb::ComplianceCheckType::Kyc) => CheckType::Kyc,
        Ok(pb::ComplianceCheckType::Aml) => CheckType::Aml,
        Ok(pb::ComplianceCheckType::Sanctions) => CheckType::Sanctions,
        _ => return Err(invalid("check_type", "must be KYC, AML or SANCTIONS")),
    };
    let result = match pb::ComplianceResult::try_from(request.result) {
        Ok(pb::ComplianceResult::Passed) => CheckResult::Passed,
        Ok(pb::ComplianceResult::Failed) => CheckResult::Failed,
        Ok(pb::ComplianceResult::Review) => CheckResult::Review,
        _ => return Err(invalid("result", "must be PASSED, FAILED or REVIEW")),
    };
    let risk_score = i16::try_from(request.risk_score)
        .ok()
        .filter(|score| *score <= 100)
        .ok_or_else(|| invalid("risk_score", "must be 0 to 100"))?;
    // Bounded well inside what PostgreSQL's timestamptz holds (4713 BC to 294276 AD): a value
    // past it was refused by the database, after the request had passed here, as an internal
    // error (found in review, session 23).
    let expires_at = match request.expires_at_ms {
        0 => None,
        ms => Some(
            Some(ms)
                .filter(|ms| (1..=MAX_EXPIRES_AT_MS).contains(ms))
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .ok_or_else(|| invalid("expires_at_ms", "must be after 1970 and before the year 10000"))?,
        ),
    };
    Ok((
        user_id(&request.user_id, "user_id")?,
        NewComplianceCheck {
            check_type,
            provider: text(&request.provider, "provider")?,
            result,
            risk_score,
            flags: list(&request.flags, "flags")?,
            expires_at,
        },
    ))
}

pub fn chain(value: i32, field: &str) -> Result<Chain, InvalidField> {
    match pb::WalletChain::try_from(value) {
        Ok(pb::WalletChain::Bitcoin) => Ok(Chain::Bitcoin),
        Ok(pb::WalletChain::Ethereum) => Ok(Chain::Ethereum),
        Ok(pb::WalletChain::Solana) => Ok(Chain::Solana),
        Ok(pb::WalletChain::Sui) => Ok(Chain::Sui),
        _ => Err(invalid(field, "must be BITCOIN, ETHEREUM, SOLANA or SUI")),
    }
}

fn wire_chain(chain: Chain) -> pb::WalletChain {
    match chain {
        Chain::Bitcoin => pb::WalletChain::Bitcoin,
        Chain::Ethereum => pb::WalletChain::Ethereum,
        Chain::Solana => pb::WalletChain::Solana,
        Chain::Sui => pb::WalletChain::Sui,
    }
}

pub fn register_wallet(request: &pb::RegisterWalletRequest) -> Result<(Uuid, NewWallet), ApiError> {
    let user = user_id(&request.user_id, "user_id")?;
    let chain = chain(request.chain, "chain")?;
    let address = address::validate_address(chain, &request.address)
        .map_err(|error| ApiError::InvalidWallet { field: "address".to_string(), error })?;
    let public_key = if request.public_key.is_empty() {
        None
    } else {
        address::validate_public_key(&request.public_key)
            .map_err(|error| ApiError::InvalidWallet { field: "public_key".to_string(), error })?;
        Some(request.public_key.clone())
    };
    debug_assert!(address.len() <= MAX_ADDRESS_LEN);
    Ok((user, NewWallet { chain, address, public_key }))
}

fn named<T>(value: &str, field: &str, parse: fn(&str) -> Option<T>, allowed: &str) -> Result<T, InvalidField> {
    parse(value).ok_or_else(|| invalid(field, format!("must be one of {allowed}")))
}

/// A limit in dollars: a positive decimal at most cents, or empty for none.
fn limit(value: &str, field: &str) -> Result<Option<String>, InvalidField> {
    if value.is_empty() {
        return Ok(None);
    }
    Amount::parse(value, Asset::USD).map_err(|error| invalid(field, error.to_string()))?;
    Ok(Some(value.to_string()))
}

pub fn domain_account(request: &pb::OpenDomainAccountRequest) -> Result<(Uuid, NewDomainAccount), InvalidField> {
    use pb::open_domain_account_request::Account;
    let account_id = convert::uuid(&request.account_id, "account_id")?;
    let tolerances = "conservative, moderate, aggressive";
    let (domain, kind, settings) = match request.account.as_ref() {
        None => return Err(invalid("account", "is required: banking, investing or defi")),
        Some(Account::Banking(banking)) => {
            let kind =
                named(&banking.kind, "banking.kind", BankingKind::from_name, "checking, savings, credit_card, wire")?;
            let verification = named(
                &banking.verification_status,
                "banking.verification_status",
                Verification::from_name,
                "unverified, pending, verified",
            )?;
            let settings = serde_json::json!({
                "verification_status": verification.name(),
                "daily_limit": limit(&banking.daily_limit, "banking.daily_limit")?,
                "monthly_limit": limit(&banking.monthly_limit, "banking.monthly_limit")?,
            });
            (Domain::Banking, kind.name(), settings)
        }
        Some(Account::Investing(investing)) => {
            let kind =
                named(&investing.kind, "investing.kind", InvestingKind::from_name, "brokerage, retirement, margin")?;
            let tolerance =
                named(&investing.risk_tolerance, "investing.risk_tolerance", RiskTolerance::from_name, tolerances)?;
            if investing.margin_enabled && kind != InvestingKind::Margin {
                return Err(invalid("investing.margin_enabled", "only a margin account may enable margin"));
            }
            let settings = serde_json::json!({
                "trading_enabled": investing.trading_enabled,
                "margin_enabled": investing.margin_enabled,
                "risk_tolerance": tolerance.name(),
            });
            (Domain::Investing, kind.name(), settings)
        }
        Some(Account::Defi(defi)) => {
            let kind = named(&defi.kind, "defi.kind", DefiKind::from_name, "hot, hardware, multisig")?;
            let chain = chain(defi.chain, "defi.chain")?;
            let tolerance = named(&defi.risk_tolerance, "defi.risk_tolerance", RiskTolerance::from_name, tolerances)?;
            let settings = serde_json::json!({
                "chain": chain.name(),
                "auto_compound": defi.auto_compound,
                "risk_tolerance": tolerance.name(),
            });
            (Domain::Defi, kind.name(), settings)
        }
    };
    Ok((user_id(&request.user_id, "user_id")?, NewDomainAccount { account_id, domain, kind, settings }))
}

fn millis(time: Option<DateTime<Utc>>) -> i64 {
    time.map_or(0, |time| time.timestamp_millis())
}

fn wire_kyc(status: KycStatus) -> pb::KycStatus {
    match status {
        KycStatus::NotStarted => pb::KycStatus::NotStarted,
        KycStatus::Pending => pb::KycStatus::Pending,
        KycStatus::Verified => pb::KycStatus::Verified,
        KycStatus::Rejected => pb::KycStatus::Rejected,
        KycStatus::Expired => pb::KycStatus::Expired,
    }
}

fn wire_risk(level: RiskLevel) -> pb::RiskLevel {
    match level {
        RiskLevel::Unassessed => pb::RiskLevel::Unassessed,
        RiskLevel::Low => pb::RiskLevel::Low,
        RiskLevel::Medium => pb::RiskLevel::Medium,
        RiskLevel::High => pb::RiskLevel::High,
        RiskLevel::Prohibited => pb::RiskLevel::Prohibited,
    }
}

fn wire_check(record: &ComplianceCheckRecord) -> pb::ComplianceCheck {
    let check = &record.check;
    pb::ComplianceCheck {
        check_id: record.check_id.to_string(),
        check_type: match check.check_type {
            CheckType::Kyc => pb::ComplianceCheckType::Kyc,
            CheckType::Aml => pb::ComplianceCheckType::Aml,
            CheckType::Sanctions => pb::ComplianceCheckType::Sanctions,
        }
        .into(),
        provider: check.provider.clone(),
        result: match check.result {
            CheckResult::Passed => pb::ComplianceResult::Passed,
            CheckResult::Failed => pb::ComplianceResult::Failed,
            CheckResult::Review => pb::ComplianceResult::Review,
        }
        .into(),
        risk_score: u32::try_from(check.risk_score).unwrap_or_default(),
        flags: check.flags.clone(),
        checked_at_ms: record.checked_at.timestamp_millis(),
        expires_at_ms: millis(check.expires_at),
    }
}

pub fn user(record: &UserRecord) -> pb::User {
    let personal = |field: PersonalField| {
        record.personal.iter().find(|(stored, _)| *stored == field).map(|(_, value)| value.clone()).unwrap_or_default()
    };
    let documents = personal(PersonalField::KycDocuments);
    pb::User {
        user_id: record.user_id.to_string(),
        email: personal(PersonalField::Email),
        two_factor_enabled: record.two_factor_enabled,
        profile: Some(pb::Profile {
            given_name: personal(PersonalField::GivenName),
            family_name: personal(PersonalField::FamilyName),
            phone: personal(PersonalField::Phone),
            date_of_birth: personal(PersonalField::DateOfBirth),
            nationality: personal(PersonalField::Nationality),
        }),
        preferences: Some(pb::Preferences {
            timezone: record.preferences.timezone.clone(),
            language: record.preferences.language.clone(),
            currency: record.preferences.currency.clone(),
        }),
        mascot: match record.mascot {
            Mascot::Acqua => pb::Mascot::Acqua,
            Mascot::Mystic => pb::Mascot::Mystic,
            Mascot::Coral => pb::Mascot::Coral,
        }
        .into(),
        experience_level: match record.experience_level {
            ExperienceLevel::Beginner => pb::ExperienceLevel::Beginner,
            ExperienceLevel::Intermediate => pb::ExperienceLevel::Intermediate,
            ExperienceLevel::Advanced => pb::ExperienceLevel::Advanced,
        }
        .into(),
        kyc_status: wire_kyc(record.kyc_status).into(),
        risk_level: wire_risk(record.risk_level).into(),
        compliance_flags: record.compliance_flags.clone(),
        document_references: if documents.is_empty() {
            Vec::new()
        } else {
            documents.split('\n').map(str::to_string).collect()
        },
        points: record.points,
        streak_days: record.streak_days,
        enabled_domains: record.enabled_domains.clone(),
        last_active_at_ms: millis(record.last_active_at),
        erased: record.erased,
        wallets: record
            .wallets
            .iter()
            .map(|(chain, address, public_key)| pb::Wallet {
                chain: wire_chain(*chain).into(),
                address: address.clone(),
                public_key: public_key.clone().unwrap_or_default(),
            })
            .collect(),
        domain_accounts: record
            .domain_accounts
            .iter()
            .map(|(account_id, domain, kind, settings)| pb::DomainAccountRecord {
                account_id: account_id.to_string(),
                domain: domain.clone(),
                kind: kind.clone(),
                settings_json: settings.to_string(),
            })
            .collect(),
        compliance_checks: record.compliance_checks.iter().map(wire_check).collect(),
    }
}
