//! The directory's data, as validated values: what the API layer builds from a request and the
//! store writes. Each closed set of values is an enum whose `name` is the text PostgreSQL's CHECK
//! constraints accept.

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::engine::account::Domain;
use crate::engine::asset::Chain;
use crate::engine::transaction;

/// Enums stored as text: the stored name of each variant.
macro_rules! stored_names {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn from_name(text: &str) -> Option<$name> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

stored_names!(Mascot { Acqua => "acqua", Mystic => "mystic", Coral => "coral" });
stored_names!(ExperienceLevel { Beginner => "beginner", Intermediate => "intermediate", Advanced => "advanced" });
stored_names!(KycStatus {
    NotStarted => "not_started", Pending => "pending", Verified => "verified", Rejected => "rejected", Expired => "expired",
});
stored_names!(RiskLevel {
    Unassessed => "unassessed", Low => "low", Medium => "medium", High => "high", Prohibited => "prohibited",
});
stored_names!(CheckType { Kyc => "kyc", Aml => "aml", Sanctions => "sanctions" });
stored_names!(CheckResult { Passed => "passed", Failed => "failed", Review => "review" });
stored_names!(BankingKind { Checking => "checking", Savings => "savings", CreditCard => "credit_card", Wire => "wire" });
stored_names!(InvestingKind { Brokerage => "brokerage", Retirement => "retirement", Margin => "margin" });
stored_names!(DefiKind { Hot => "hot", Hardware => "hardware", Multisig => "multisig" });
stored_names!(Verification { Unverified => "unverified", Pending => "pending", Verified => "verified" });
stored_names!(RiskTolerance { Conservative => "conservative", Moderate => "moderate", Aggressive => "aggressive" });

/// The encrypted fields of a user, with their sensitivity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PersonalField {
    Email,
    GivenName,
    FamilyName,
    Phone,
    DateOfBirth,
    Nationality,
    KycDocuments,
}

impl PersonalField {
    pub const ALL: [PersonalField; 7] = [
        PersonalField::Email,
        PersonalField::GivenName,
        PersonalField::FamilyName,
        PersonalField::Phone,
        PersonalField::DateOfBirth,
        PersonalField::Nationality,
        PersonalField::KycDocuments,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PersonalField::Email => "email",
            PersonalField::GivenName => "given_name",
            PersonalField::FamilyName => "family_name",
            PersonalField::Phone => "phone",
            PersonalField::DateOfBirth => "date_of_birth",
            PersonalField::Nationality => "nationality",
            PersonalField::KycDocuments => "kyc_documents",
        }
    }

    pub fn from_name(text: &str) -> Option<PersonalField> {
        PersonalField::ALL.into_iter().find(|field| field.name() == text)
    }

    pub fn sensitivity(self) -> super::encryption::Sensitivity {
        use super::encryption::Sensitivity;
        match self {
            PersonalField::KycDocuments => Sensitivity::Document,
            _ => Sensitivity::Pii,
        }
    }
}

/// Personal values to write: each is sealed before it leaves the process.
pub type PersonalValues = Vec<(PersonalField, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preferences {
    pub timezone: String,
    pub language: String,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub user_id: Uuid,
    pub email: String,
    pub two_factor_enabled: bool,
    /// Profile values (names, phone, date of birth, nationality) that were given.
    pub profile: PersonalValues,
    pub preferences: Preferences,
    pub mascot: Mascot,
    pub experience_level: ExperienceLevel,
}

/// A partial update: `None` leaves the stored value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserUpdate {
    pub email: Option<String>,
    pub two_factor_enabled: Option<bool>,
    pub profile: PersonalValues,
    pub timezone: Option<String>,
    pub language: Option<String>,
    pub currency: Option<String>,
    pub mascot: Option<Mascot>,
    pub experience_level: Option<ExperienceLevel>,
    pub points: Option<i64>,
    pub streak_days: Option<i32>,
    pub enabled_domains: Option<Vec<Domain>>,
    pub touch_last_active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KycUpdate {
    pub status: KycStatus,
    pub risk_level: RiskLevel,
    pub compliance_flags: Vec<String>,
    /// Replaces the stored document references when `Some`.
    pub document_references: Option<Vec<String>>,
}

impl KycUpdate {
    /// What the ledger's compliance gate (issue 5's engine record) makes of this update. The
    /// directory keeps the finer statuses; the gate has fewer and errs on the side of refusing:
    /// - an expired KYC must be done again: the gate treats it as not started (nothing passes);
    /// - a risk level not yet assessed is not a low one: high (every transaction goes to AML review);
    /// - a prohibited user is refused outright: KYC rejected, risk high.
    pub fn gate_record(&self) -> (transaction::KycStatus, transaction::RiskLevel) {
        let kyc = match self.status {
            KycStatus::NotStarted | KycStatus::Expired => transaction::KycStatus::NotStarted,
            KycStatus::Pending => transaction::KycStatus::Pending,
            KycStatus::Verified => transaction::KycStatus::Verified,
            KycStatus::Rejected => transaction::KycStatus::Rejected,
        };
        match self.risk_level {
            RiskLevel::Low => (kyc, transaction::RiskLevel::Low),
            RiskLevel::Medium => (kyc, transaction::RiskLevel::Medium),
            RiskLevel::Unassessed | RiskLevel::High => (kyc, transaction::RiskLevel::High),
            RiskLevel::Prohibited => (transaction::KycStatus::Rejected, transaction::RiskLevel::High),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewComplianceCheck {
    pub check_type: CheckType,
    pub provider: String,
    pub result: CheckResult,
    pub risk_score: i16,
    pub flags: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWallet {
    pub chain: Chain,
    pub address: String,
    pub public_key: Option<String>,
}

/// A domain account record: its domain, its kind and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDomainAccount {
    pub account_id: Uuid,
    pub domain: Domain,
    pub kind: &'static str,
    pub settings: serde_json::Value,
}

/// A user as read back, with the personal data opened.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub user_id: Uuid,
    pub two_factor_enabled: bool,
    pub personal: Vec<(PersonalField, String)>,
    pub preferences: Preferences,
    pub mascot: Mascot,
    pub experience_level: ExperienceLevel,
    pub kyc_status: KycStatus,
    pub risk_level: RiskLevel,
    pub compliance_flags: Vec<String>,
    pub points: i64,
    pub streak_days: i32,
    pub enabled_domains: Vec<String>,
    pub last_active_at: Option<DateTime<Utc>>,
    pub erased: bool,
    pub wallets: Vec<(Chain, String, Option<String>)>,
    pub domain_accounts: Vec<(Uuid, String, String, serde_json::Value)>,
    pub compliance_checks: Vec<ComplianceCheckRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComplianceCheckRecord {
    pub check_id: Uuid,
    pub check: NewComplianceCheck,
    pub checked_at: DateTime<Utc>,
}

/// Parses a date of birth (YYYY-MM-DD, not in the future, not before 1900).
pub fn date_of_birth(text: &str, today: NaiveDate) -> Option<NaiveDate> {
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    let earliest = NaiveDate::from_ymd_opt(1900, 1, 1)?;
    (earliest..=today).contains(&date).then_some(date)
}
