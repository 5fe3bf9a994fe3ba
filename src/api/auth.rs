//! Who is calling, and what they may do: bearer tokens and scopes.
//!
//! Each calling service has a token, configured as its SHA-256 digest (the server never holds
//! the token itself), a set of operations (RPC names such as `Deposit`, or `*`) and a set of
//! domains (`banking`, `investing`, `defi`, or `*`). A request's `authorization: Bearer <token>`
//! metadata names the caller: missing or unknown is UNAUTHENTICATED, outside its scopes is
//! PERMISSION_DENIED. Scopes are checked twice: the RPC name when the request arrives (see
//! `gate`), and every engine operation it carries, with the domain of every account it touches,
//! before it reaches the ledger (so a batch cannot smuggle in what the caller may not do).
//!
//! Development mode runs without tokens: every request is the caller `development` with every
//! scope. It must be asked for by name (`serve --dev-mode`), is refused on a non-loopback
//! address, and says so in a warning at start-up.
//!
//! Tokens are random 256-bit values, so a plain SHA-256 digest is a sound way to store them (a
//! slow password hash protects guessable secrets; these are not guessable).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tonic::metadata::MetadataMap;

use crate::engine::account::{AccountRef, Domain};
use crate::engine::operation::Operation;

/// The metadata key carrying `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// The longest token accepted; anything longer is malformed rather than hashed.
pub const MAX_TOKEN_LEN: usize = 512;

/// The most callers one configuration may name.
pub const MAX_CALLERS: usize = 1_024;

/// The caller every request is in development mode.
pub const DEVELOPMENT_CALLER: &str = "development";

/// Refusals of authentication and authorization.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the request carries no `authorization: Bearer <token>` metadata")]
    MissingToken,
    #[error("the authorization metadata is not `Bearer <token>`")]
    MalformedToken,
    #[error("the bearer token is not known")]
    UnknownToken,
    #[error("the service `{service}` may not use {operation}")]
    OperationNotAllowed { service: String, operation: String },
    #[error("the service `{service}` may not touch the {domain} domain")]
    DomainNotAllowed { service: String, domain: &'static str },
}

/// Problems with the callers configuration file; the server refuses to start on any of them.
#[derive(Debug, Error)]
pub enum AuthConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("caller `{service}`: {reason}")]
    Invalid { service: String, reason: String },
    #[error("the configuration names {0} callers, more than the {MAX_CALLERS} allowed")]
    TooManyCallers(usize),
    #[error("no callers are configured: give --auth-file, or --dev-mode to run without tokens")]
    NoCallers,
    #[error("development mode (no tokens) may only listen on a loopback address, not {0}")]
    DevModeNotLoopback(std::net::SocketAddr),
}

/// One caller as written in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerEntry {
    pub service: String,
    /// Lower-case hex SHA-256 of the token.
    pub token_sha256: String,
    /// RPC names (`Deposit`, `GetBalance`, `SubmitBatch`, ...) or `*`.
    pub operations: Vec<String>,
    /// `banking`, `investing`, `defi`, or `*`.
    pub domains: Vec<String>,
}

/// The configuration file: `{"callers": [CallerEntry, ...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallersFile {
    pub callers: Vec<CallerEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed<T: std::hash::Hash + Eq> {
    All,
    Only(HashSet<T>),
}

impl<T: std::hash::Hash + Eq> Allowed<T> {
    fn contains(&self, value: &T) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Only(values) => values.contains(value),
        }
    }
}

/// An authenticated calling service and its scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    service: String,
    operations: Allowed<String>,
    domains: Allowed<Domain>,
}

impl Caller {
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Refuses `operation` (an RPC name) unless the caller's scopes hold it.
    pub fn require_operation(&self, operation: &str) -> Result<(), AuthError> {
        if self.operations.contains(&operation.to_owned()) {
            Ok(())
        } else {
            Err(AuthError::OperationNotAllowed { service: self.service.clone(), operation: operation.to_owned() })
        }
    }

    pub fn may_touch(&self, domain: Domain) -> bool {
        self.domains.contains(&domain)
    }

    pub fn require_domain(&self, domain: Domain) -> Result<(), AuthError> {
        if self.may_touch(domain) {
            Ok(())
        } else {
            Err(AuthError::DomainNotAllowed { service: self.service.clone(), domain: domain.name() })
        }
    }

    /// Refuses `operation` unless the caller may use its kind and touch every user account it
    /// names. `domains` tells the domain of a reservation or transaction that the operation names
    /// only by id; `None` means it is unknown, and the engine will refuse the operation as
    /// NOT_FOUND anyway.
    pub fn require_engine_operation(&self, operation: &Operation, domains: &dyn DomainLookup) -> Result<(), AuthError> {
        let require_account = |account: &AccountRef| match account {
            AccountRef::User(user) => self.require_domain(user.domain),
            AccountRef::System(_) => Ok(()),
        };
        match operation {
            Operation::OpenAccount { account, .. } => {
                self.require_operation("OpenAccount")?;
                self.require_domain(account.domain)
            }
            Operation::SetFrozen { account, .. } => {
                self.require_operation("SetFrozen")?;
                self.require_domain(account.domain)
            }
            Operation::Deposit { account, .. } => {
                self.require_operation("Deposit")?;
                self.require_domain(account.domain)
            }
            Operation::Withdraw { account, .. } => {
                self.require_operation("Withdraw")?;
                self.require_domain(account.domain)
            }
            Operation::Reserve { account, .. } => {
                self.require_operation("Reserve")?;
                self.require_domain(account.domain)
            }
            Operation::Commit { user_id, reservation_id, destination, .. } => {
                self.require_operation("Commit")?;
                require_account(destination)?;
                domains
                    .reservation_domain(*user_id, *reservation_id)
                    .map_or(Ok(()), |domain| self.require_domain(domain))
            }
            Operation::Release { user_id, reservation_id } => {
                self.require_operation("Release")?;
                domains
                    .reservation_domain(*user_id, *reservation_id)
                    .map_or(Ok(()), |domain| self.require_domain(domain))
            }
            Operation::Transfer { from, to, .. } => {
                self.require_operation("Transfer")?;
                require_account(from)?;
                require_account(to)
            }
            Operation::Convert { from, to, .. } => {
                self.require_operation("Convert")?;
                self.require_domain(from.domain)?;
                self.require_domain(to.domain)
            }
            // The transaction RPCs' own names were checked by the gate; the domain is the
            // transaction's (and the payer's and payee's, which belong to it).
            Operation::InitiateTransaction { transaction } => {
                self.require_domain(transaction.domain)?;
                require_account(&transaction.payer)?;
                require_account(&transaction.payee)
            }
            Operation::TransitionTransaction { user_id, transaction_id, .. } => domains
                .transaction_domain(*user_id, *transaction_id)
                .map_or(Ok(()), |domain| self.require_domain(domain)),
            // A user's KYC record spans every domain: the RPC's scope is the check.
            Operation::SetCompliance { .. } | Operation::SetKyc { .. } => Ok(()),
            Operation::LinkedBatch { operations } => {
                operations.iter().try_for_each(|member| self.require_engine_operation(member, domains))
            }
        }
    }
}

/// Where the scope checks learn the domain of something an operation names only by id.
pub trait DomainLookup {
    fn reservation_domain(&self, user_id: uuid::Uuid, reservation_id: uuid::Uuid) -> Option<Domain>;
    fn transaction_domain(&self, user_id: uuid::Uuid, transaction_id: uuid::Uuid) -> Option<Domain>;
}

impl DomainLookup for crate::ledger::Ledger {
    fn reservation_domain(&self, user_id: uuid::Uuid, reservation_id: uuid::Uuid) -> Option<Domain> {
        crate::ledger::Ledger::reservation_domain(self, user_id, reservation_id)
    }

    fn transaction_domain(&self, user_id: uuid::Uuid, transaction_id: uuid::Uuid) -> Option<Domain> {
        crate::ledger::Ledger::transaction_domain(self, user_id, transaction_id)
    }
}

/// How requests are authenticated.
#[derive(Debug)]
pub enum Authenticator {
    /// Known token digests and their callers.
    Tokens(HashMap<[u8; 32], Arc<Caller>>),
    /// No tokens: every request is [`DEVELOPMENT_CALLER`] with every scope.
    Development(Arc<Caller>),
}

impl Authenticator {
    pub fn development() -> Authenticator {
        Authenticator::Development(Arc::new(Caller {
            service: DEVELOPMENT_CALLER.to_owned(),
            operations: Allowed::All,
            domains: Allowed::All,
        }))
    }

    pub fn is_development(&self) -> bool {
        matches!(self, Authenticator::Development(_))
    }

    /// Builds the token table from a parsed configuration, refusing anything ambiguous.
    pub fn from_callers(file: &CallersFile) -> Result<Authenticator, AuthConfigError> {
        if file.callers.is_empty() {
            return Err(AuthConfigError::NoCallers);
        }
        if file.callers.len() > MAX_CALLERS {
            return Err(AuthConfigError::TooManyCallers(file.callers.len()));
        }
        let mut tokens = HashMap::with_capacity(file.callers.len());
        for entry in &file.callers {
            let invalid = |reason: String| AuthConfigError::Invalid { service: entry.service.clone(), reason };
            if entry.service.is_empty() || entry.service.len() > 64 {
                return Err(invalid("the service name must be 1 to 64 characters".to_owned()));
            }
            let digest = parse_digest(&entry.token_sha256)
                .ok_or_else(|| invalid("token_sha256 must be 64 lower-case hex digits".to_owned()))?;
            let caller = Caller {
                service: entry.service.clone(),
                operations: allowed(&entry.operations, |name| Some(name.to_owned()))
                    .ok_or_else(|| invalid("operations must be `*` or a non-empty list of RPC names".to_owned()))?,
                domains: allowed(&entry.domains, Domain::parse)
                    .ok_or_else(|| invalid("domains must be `*` or banking, investing, defi".to_owned()))?,
            };
            if tokens.insert(digest, Arc::new(caller)).is_some() {
                return Err(invalid("another caller has the same token".to_owned()));
            }
        }
        Ok(Authenticator::Tokens(tokens))
    }

    /// Reads and checks a callers file (see [`CallersFile`]).
    pub fn from_file(path: &Path) -> Result<Authenticator, AuthConfigError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read { path: shown.clone(), source })?;
        let file: CallersFile =
            serde_json::from_str(&text).map_err(|source| AuthConfigError::Parse { path: shown, source })?;
        Authenticator::from_callers(&file)
    }

    /// The caller a request's metadata names.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Arc<Caller>, AuthError> {
        let tokens = match self {
            Authenticator::Development(caller) => return Ok(Arc::clone(caller)),
            Authenticator::Tokens(tokens) => tokens,
        };
        let value = metadata.get(AUTHORIZATION).ok_or(AuthError::MissingToken)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|header| header.strip_prefix("Bearer "))
            .filter(|token| !token.is_empty() && token.len() <= MAX_TOKEN_LEN)
            .ok_or(AuthError::MalformedToken)?;
        tokens.get(&digest(token)).map(Arc::clone).ok_or(AuthError::UnknownToken)
    }
}

fn allowed<T: std::hash::Hash + Eq>(names: &[String], parse: impl Fn(&str) -> Option<T>) -> Option<Allowed<T>> {
    if names.iter().any(|name| name == "*") {
        return Some(Allowed::All);
    }
    if names.is_empty() {
        return None;
    }
    names.iter().map(|name| parse(name)).collect::<Option<HashSet<T>>>().map(Allowed::Only)
}

/// SHA-256 of a token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_digest(hex_digits: &str) -> Option<[u8; 32]> {
    if hex_digits.len() != 64 || hex_digits.bytes().any(|byte| byte.is_ascii_uppercase()) {
        return None;
    }
    let mut digest = [0_u8; 32];
    hex::decode_to_slice(hex_digits, &mut digest).ok()?;
    Some(digest)
}

/// A new random token (256 bits, hex) and the configuration entry that admits it.
pub fn new_token(service: &str, operations: Vec<String>, domains: Vec<String>) -> (String, CallerEntry) {
    let bytes: [u8; 32] = rand::random();
    let token = hex::encode(bytes);
    let entry =
        CallerEntry { service: service.to_owned(), token_sha256: hex::encode(digest(&token)), operations, domains };
    (token, entry)
}

tokio::task_local! {
    static CURRENT: Arc<Caller>;
}

/// Runs `handler` with `caller` as the current request's caller (see [`current`]).
pub async fn scope<F: std::future::Future>(caller: Arc<Caller>, handler: F) -> F::Output {
    CURRENT.scope(caller, handler).await
}

/// The caller of the request being handled on this task, if any.
pub fn current() -> Option<Arc<Caller>> {
    CURRENT.try_with(Arc::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn entry(token: &str, operations: &[&str], domains: &[&str]) -> CallerEntry {
        CallerEntry {
            service: "payments".to_owned(),
            token_sha256: hex::encode(digest(token)),
            operations: operations.iter().map(|name| (*name).to_owned()).collect(),
            domains: domains.iter().map(|name| (*name).to_owned()).collect(),
        }
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(AUTHORIZATION, MetadataValue::try_from(format!("Bearer {token}")).unwrap());
        metadata
    }

    #[test]
    fn a_known_token_names_its_caller_and_nothing_else_does() {
        let auth =
            Authenticator::from_callers(&CallersFile { callers: vec![entry("secret", &["Deposit"], &["banking"])] })
                .unwrap();
        assert_eq!(auth.authenticate(&bearer("secret")).unwrap().service(), "payments");
        assert_eq!(auth.authenticate(&bearer("other")).unwrap_err(), AuthError::UnknownToken);
        assert_eq!(auth.authenticate(&MetadataMap::new()).unwrap_err(), AuthError::MissingToken);
        let mut basic = MetadataMap::new();
        basic.insert(AUTHORIZATION, MetadataValue::from_static("Basic abc"));
        assert_eq!(auth.authenticate(&basic).unwrap_err(), AuthError::MalformedToken);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut bad_digest = entry("secret", &["*"], &["*"]);
        bad_digest.token_sha256 = "ABC".to_owned();
        for file in [
            CallersFile::default(),
            CallersFile { callers: vec![bad_digest] },
            CallersFile { callers: vec![entry("secret", &[], &["*"])] },
            CallersFile { callers: vec![entry("secret", &["*"], &["savings"])] },
            CallersFile { callers: vec![entry("same", &["*"], &["*"]), entry("same", &["*"], &["*"])] },
        ] {
            assert!(Authenticator::from_callers(&file).is_err(), "{file:?}");
        }
    }

    #[test]
    fn new_tokens_are_admitted_by_their_entry() {
        let (token, entry) = new_token("trading", vec!["*".to_owned()], vec!["investing".to_owned()]);
        assert_eq!(token.len(), 64);
        let auth = Authenticator::from_callers(&CallersFile { callers: vec![entry] }).unwrap();
        let caller = auth.authenticate(&bearer(&token)).unwrap();
        assert!(caller.require_domain(Domain::Investing).is_ok());
        assert!(caller.require_domain(Domain::Banking).is_err());
    }
}
