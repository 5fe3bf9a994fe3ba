//! What the load generator asks for: the operation mix, the users it touches (uniformly or
//! Zipf-skewed onto hot accounts), and the operations themselves, the same for the gRPC run and
//! the PostgreSQL baseline so the two do the same work.

use rand::Rng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};
use thiserror::Error;
use uuid::Uuid;

/// The most users a run may spread over (each is opened and funded before the run).
pub const MAX_USERS: u64 = 10_000_000;

/// One unit of work. Reserve-then-commit is two operations that depend on each other: one
/// linked group in a batch, two calls in unary mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deposit,
    Withdraw,
    Transfer,
    ReserveCommit,
}

impl Kind {
    /// How many ledger operations (durable changes) one unit is.
    pub fn operations(self) -> u64 {
        match self {
            Kind::ReserveCommit => 2,
            _ => 1,
        }
    }

    fn parse(name: &str) -> Option<Kind> {
        match name {
            "deposit" => Some(Kind::Deposit),
            "withdraw" => Some(Kind::Withdraw),
            "transfer" => Some(Kind::Transfer),
            "reserve-commit" => Some(Kind::ReserveCommit),
            _ => None,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WorkloadError {
    #[error("the mix `{0}` is not `kind=weight,...` with kinds deposit, withdraw, transfer, reserve-commit")]
    Mix(String),
    #[error("users must be 2 to {MAX_USERS}")]
    Users,
    #[error("the Zipf exponent must be positive and finite")]
    Exponent,
}

/// Weighted kinds, e.g. `transfer=60,deposit=20,withdraw=10,reserve-commit=10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    weighted: Vec<(Kind, u32)>,
    total_weight: u32,
}

impl Mix {
    pub fn parse(text: &str) -> Result<Mix, WorkloadError> {
        let bad = || WorkloadError::Mix(text.to_owned());
        let mut weighted = Vec::new();
        for part in text.split(',') {
            let (name, weight) = part.split_once('=').ok_or_else(bad)?;
            let kind = Kind::parse(name.trim()).ok_or_else(bad)?;
            let weight: u32 = weight.trim().parse().map_err(|_| bad())?;
            if weight > 0 {
                weighted.push((kind, weight));
            }
        }
        let total_weight = weighted.iter().try_fold(0_u32, |sum, (_, weight)| sum.checked_add(*weight));
        match total_weight {
            Some(total_weight) if total_weight > 0 => Ok(Mix { weighted, total_weight }),
            _ => Err(bad()),
        }
    }

    pub fn pick(&self, rng: &mut SmallRng) -> Kind {
        let mut ticket = rng.random_range(0..self.total_weight);
        for (kind, weight) in &self.weighted {
            if ticket < *weight {
                return *kind;
            }
            ticket -= weight;
        }
        self.weighted[0].0
    }
}

/// How users are chosen: each equally often, or Zipf-skewed so a few hot users take most.
#[derive(Debug, Clone, Copy)]
pub enum Spread {
    Uniform,
    Zipf(Zipf<f64>),
}

#[derive(Debug, Clone, Copy)]
pub struct Users {
    count: u64,
    spread: Spread,
}

impl Users {
    pub fn new(count: u64, zipf_exponent: Option<f64>) -> Result<Users, WorkloadError> {
        if !(2..=MAX_USERS).contains(&count) {
            return Err(WorkloadError::Users);
        }
        let spread = match zipf_exponent {
            None => Spread::Uniform,
            Some(exponent) if exponent > 0.0 && exponent.is_finite() => {
                Spread::Zipf(Zipf::new(count as f64, exponent).map_err(|_| WorkloadError::Exponent)?)
            }
            Some(_) => return Err(WorkloadError::Exponent),
        };
        Ok(Users { count, spread })
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The n-th user's id (0-based): stable across runs, so a rerun reuses the funded accounts.
    pub fn id(&self, n: u64) -> Uuid {
        Uuid::from_u128(0x10ad_0000_0000_4000_8000_0000_0000_0000 | u128::from(n))
    }

    /// A user index chosen by the spread.
    pub fn pick(&self, rng: &mut SmallRng) -> u64 {
        match self.spread {
            Spread::Uniform => rng.random_range(0..self.count),
            // Zipf samples 1..=count as floats; rank 1 is the hottest.
            Spread::Zipf(zipf) => (zipf.sample(rng) as u64).clamp(1, self.count) - 1,
        }
    }

    /// A second user, different from `first`, chosen uniformly (the other side of a transfer).
    pub fn other(&self, first: u64, rng: &mut SmallRng) -> u64 {
        let offset = rng.random_range(1..self.count);
        (first + offset) % self.count
    }
}

/// One unit of work, resolved to users, ready for either driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    pub kind: Kind,
    pub user: Uuid,
    /// The counterparty of a transfer (unused otherwise).
    pub other: Uuid,
    /// The reservation of a reserve-commit: unique per run (see [`reservation_id`]).
    pub reservation: Uuid,
}

/// The amount every operation moves: one cent, so funded accounts last any run.
pub const AMOUNT: &str = "0.01";

/// What each user is funded with before the run.
pub const FUNDING: &str = "1000000.00";

/// The next unit of work; `reservation` is the id its reserve-commit would use.
pub fn next_unit(mix: &Mix, users: &Users, rng: &mut SmallRng, reservation: Uuid) -> Unit {
    let kind = mix.pick(rng);
    let first = users.pick(rng);
    let other = users.other(first, rng);
    Unit { kind, user: users.id(first), other: users.id(other), reservation }
}

/// A reservation id unique to (run, worker slot, request, position in the request): the random
/// choices are seeded and repeat from run to run, but reservation ids must not.
pub fn reservation_id(run_nonce: u64, slot: u64, request: u64, index: u64) -> Uuid {
    debug_assert!(slot < 1 << 16 && index < 1 << 16, "slots and batch positions fit 16 bits");
    Uuid::from_u128(
        (u128::from(run_nonce) << 64) | (u128::from(slot) << 48) | (u128::from(request) << 16) | u128::from(index),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mixes_parse_and_refuse_nonsense() {
        assert!(Mix::parse("transfer=60,deposit=20,withdraw=10,reserve-commit=10").is_ok());
        for bad in ["", "transfer", "transfer=x", "swap=1", "transfer=0"] {
            assert!(Mix::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zipf_concentrates_on_hot_users_and_uniform_does_not() {
        let mut rng = SmallRng::seed_from_u64(7);
        let hot_share = |users: Users, rng: &mut SmallRng| {
            let hits = (0..10_000).filter(|_| users.pick(rng) < 10).count();
            hits as f64 / 10_000.0
        };
        let uniform = hot_share(Users::new(10_000, None).unwrap(), &mut rng);
        let skewed = hot_share(Users::new(10_000, Some(1.1)).unwrap(), &mut rng);
        assert!(uniform < 0.01, "{uniform}");
        assert!(skewed > 0.3, "{skewed}");
        let users = Users::new(2, None).unwrap();
        assert!((0..100).all(|_| users.other(0, &mut rng) == 1));
    }
}
