//! Drives a running server over gRPC: opens and funds the users, then sends the workload,
//! unary or in SubmitBatch requests, closed-loop (each in-flight slot sends its next request
//! when the last one answers) or open-loop (requests start on a fixed schedule whether or not
//! earlier ones answered, and latency counts from the scheduled start, so a stalled server
//! cannot hide its queueing).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::Semaphore;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::report::Tally;
use super::workload::{AMOUNT, FUNDING, Kind, Unit, next_unit, reservation_id};
use super::{LoadConfig, LoadError, MAX_IN_FLIGHT, Pacing};
use crate::api::pb;
use crate::api::pb::ledger_client::LedgerClient;

/// Users opened and funded per SubmitBatch during set-up.
const SETUP_BATCH_USERS: u64 = 500;

/// The expiry of the generator's reservations. A unary reserve-commit whose commit fails (shed
/// under overload, timed out) is released at once, but that release may fail too: the short
/// expiry bounds how long such a reservation holds funds and a place under the user's cap of
/// active reservations, which a Zipf-hot user would otherwise fill over a long overloaded run.
const RESERVATION_TTL_MS: i64 = 60_000;

#[derive(Clone)]
struct Client {
    inner: LedgerClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    fn request<T>(&self, body: T) -> Request<T> {
        let mut request = Request::new(body);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", token.clone());
        }
        request
    }
}

async fn connect(config: &LoadConfig) -> Result<Vec<Client>, LoadError> {
    let token = match &config.token {
        Some(token) => Some(MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| LoadError::Token)?),
        None => None,
    };
    let mut clients = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        let channel = Channel::from_shared(config.target.clone())
            .map_err(|_| LoadError::Target(config.target.clone()))?
            .connect()
            .await?;
        let inner = LedgerClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
        clients.push(Client { inner, token: token.clone() });
    }
    Ok(clients)
}

fn account(user: uuid::Uuid) -> pb::UserAccount {
    pb::UserAccount { user_id: user.to_string(), domain: pb::Domain::Banking.into(), asset: "USD".to_owned() }
}

fn user_ref(user: uuid::Uuid) -> pb::AccountRef {
    pb::AccountRef { account: Some(pb::account_ref::Account::User(account(user))) }
}

fn single(kind: pb::operation::Kind) -> pb::Operation {
    pb::Operation { kind: Some(kind) }
}

fn deposit(user: uuid::Uuid, amount: &str) -> pb::operation::Kind {
    pb::operation::Kind::Deposit(pb::Deposit {
        account: Some(account(user)),
        amount: amount.to_owned(),
        provider: pb::Provider::Stripe.into(),
    })
}

/// The operations of one unit, in order.
fn operations(unit: &Unit) -> Vec<pb::operation::Kind> {
    match unit.kind {
        Kind::Deposit => vec![deposit(unit.user, AMOUNT)],
        Kind::Withdraw => vec![pb::operation::Kind::Withdraw(pb::Withdraw {
            account: Some(account(unit.user)),
            amount: AMOUNT.to_owned(),
            provider: pb::Provider::Stripe.into(),
        })],
        Kind::Transfer => vec![pb::operation::Kind::Transfer(pb::Transfer {
            from: Some(user_ref(unit.user)),
            to: Some(user_ref(unit.other)),
            amount: AMOUNT.to_owned(),
        })],
        Kind::ReserveCommit => vec![
            pb::operation::Kind::Reserve(pb::Reserve {
                reservation_id: unit.reservation.to_string(),
                account: Some(account(unit.user)),
                amount: AMOUNT.to_owned(),
                ttl_ms: Some(RESERVATION_TTL_MS),
            }),
            pb::operation::Kind::Commit(pb::Commit {
                user_id: unit.user.to_string(),
                reservation_id: unit.reservation.to_string(),
                destination: Some(user_ref(unit.other)),
                amount: None,
            }),
        ],
    }
}

fn entry(key: String, unit: &Unit) -> pb::BatchEntry {
    let mut operations = operations(unit);
    let kind = if operations.len() == 1 {
        operations.pop().map(|kind| pb::batch_entry::Kind::Single(single(kind)))
    } else {
        Some(pb::batch_entry::Kind::Linked(pb::LinkedGroup {
            operations: operations.into_iter().map(single).collect(),
        }))
    };
    pb::BatchEntry { idempotency_key: key, kind }
}

fn code_name(status: &Status) -> String {
    format!("{:?}", status.code())
}

/// Opens every user's account (an existing one is fine: reruns reuse them) and funds it.
pub async fn set_up(config: &LoadConfig) -> Result<(), LoadError> {
    let clients = connect(config).await?;
    let mut client = clients[0].clone();
    let users = config.users;
    let mut first = 0;
    while first < users.count() {
        let last = (first + SETUP_BATCH_USERS).min(users.count());
        let mut entries = Vec::with_capacity(2 * (last - first) as usize);
        for n in first..last {
            let user = users.id(n);
            let open = pb::operation::Kind::OpenAccount(pb::OpenAccount {
                account: Some(account(user)),
                ..Default::default()
            });
            entries.push(pb::BatchEntry {
                idempotency_key: format!("load-open-{n}"),
                kind: Some(pb::batch_entry::Kind::Single(single(open))),
            });
            entries.push(pb::BatchEntry {
                idempotency_key: format!("load-fund-{}-{n}", config.run_id),
                kind: Some(pb::batch_entry::Kind::Single(single(deposit(user, FUNDING)))),
            });
        }
        let results = client.inner.submit_batch(client.request(pb::SubmitBatchRequest { entries })).await?.into_inner();
        for result in results.results {
            if let Some(pb::batch_result::Result::Error(status)) = result.result {
                // An account left by an earlier run is what we want; anything else is not.
                if status.code != Code::AlreadyExists as i32 {
                    return Err(LoadError::SetUp(status.message));
                }
            }
        }
        first = last;
    }
    Ok(())
}

/// Sends one operation as its own unary RPC.
async fn unary(client: &mut Client, key: String, operation: pb::operation::Kind) -> Result<(), Status> {
    use pb::operation::Kind as Op;
    let idempotency_key = key;
    match operation {
        Op::Deposit(operation) => {
            let request = client.request(pb::DepositRequest { idempotency_key, operation: Some(operation) });
            client.inner.deposit(request).await.map(drop)
        }
        Op::Withdraw(operation) => {
            let request = client.request(pb::WithdrawRequest { idempotency_key, operation: Some(operation) });
            client.inner.withdraw(request).await.map(drop)
        }
        Op::Transfer(operation) => {
            let request = client.request(pb::TransferRequest { idempotency_key, operation: Some(operation) });
            client.inner.transfer(request).await.map(drop)
        }
        Op::Reserve(operation) => {
            let request = client.request(pb::ReserveRequest { idempotency_key, operation: Some(operation) });
            client.inner.reserve(request).await.map(drop)
        }
        Op::Commit(operation) => {
            let request = client.request(pb::CommitRequest { idempotency_key, operation: Some(operation) });
            client.inner.commit(request).await.map(drop)
        }
        Op::Release(operation) => {
            let request = client.request(pb::ReleaseRequest { idempotency_key, operation: Some(operation) });
            client.inner.release(request).await.map(drop)
        }
        other => Err(Status::unimplemented(format!("the load generator does not send {other:?} alone"))),
    }
}

/// Releases the reservation of a reserve-commit whose commit failed, as a careful caller would,
/// so it does not hold the funds until it expires. If the commit did apply (its answer was lost),
/// the release is refused and changes nothing. Neither counted nor timed: it is not part of the
/// workload, and its own failure leaves the reservation to its expiry (`RESERVATION_TTL_MS`).
async fn release_after_failed_commit(client: &mut Client, key: &str, unit: &Unit) {
    let release = pb::operation::Kind::Release(pb::Release {
        user_id: unit.user.to_string(),
        reservation_id: unit.reservation.to_string(),
    });
    if let Err(status) = unary(client, format!("{key}-release"), release).await {
        tracing::debug!(code = ?status.code(), "release after a failed commit failed; the reservation expires");
    }
}

/// Sends one request (a unary unit, or a batch of units) and tallies it.
async fn send(
    client: &mut Client,
    config: &LoadConfig,
    units: Vec<(String, Unit)>,
    tally: &mut Tally,
    started: Instant,
) {
    if config.batch_size == 0 {
        let mut failed_commits = Vec::new();
        for (key, unit) in units {
            // A unary reserve-commit is two calls: the commit only if the reserve worked.
            for (step, operation) in operations(&unit).into_iter().enumerate() {
                match unary(client, format!("{key}-{step}"), operation).await {
                    Ok(()) => tally.operations += 1,
                    Err(status) => {
                        tally.record_error(code_name(&status));
                        if step > 0 {
                            failed_commits.push((key, unit));
                        }
                        break;
                    }
                }
            }
        }
        // The releases are the generator's own clean-up, not the workload: outside its latency.
        tally.record_latency(started.elapsed());
        for (key, unit) in failed_commits {
            release_after_failed_commit(client, &key, &unit).await;
        }
        return;
    }
    let operations_per_entry: Vec<u64> = units.iter().map(|(_, unit)| unit.kind.operations()).collect();
    let entries = units.into_iter().map(|(key, unit)| entry(key, &unit)).collect();
    match client.inner.submit_batch(client.request(pb::SubmitBatchRequest { entries })).await {
        Ok(response) => {
            for (result, operations) in response.into_inner().results.into_iter().zip(operations_per_entry) {
                match result.result {
                    Some(pb::batch_result::Result::Error(status)) => {
                        tally.record_error(format!("{:?}", Code::from_i32(status.code)));
                    }
                    _ => tally.operations += operations,
                }
            }
        }
        Err(status) => tally.record_error(code_name(&status)),
    }
    tally.record_latency(started.elapsed());
}

/// Runs the workload for the configured duration and returns the merged tally.
pub async fn run(config: Arc<LoadConfig>) -> Result<(Tally, Duration), LoadError> {
    let clients = connect(&config).await?;
    let units_per_request = config.batch_size.max(1);
    let began = Instant::now();
    let until = began + Duration::from_secs(config.duration_s);
    let mut workers = Vec::new();
    match config.pacing {
        Pacing::Closed => {
            for slot in 0..config.in_flight {
                let mut client = clients[slot % clients.len()].clone();
                let config = Arc::clone(&config);
                workers.push(tokio::spawn(async move {
                    let mut rng = SmallRng::seed_from_u64(config.seed ^ slot as u64);
                    let mut tally = Tally::default();
                    let mut sent: u64 = 0;
                    while Instant::now() < until {
                        let units = (0..units_per_request)
                            .map(|index| {
                                let key = format!("load-{}-{slot}-{sent}-{index}", config.run_id);
                                let reservation = reservation_id(config.run_nonce(), slot as u64, sent, index as u64);
                                (key, next_unit(&config.mix, &config.users, &mut rng, reservation))
                            })
                            .collect();
                        send(&mut client, &config, units, &mut tally, Instant::now()).await;
                        sent += 1;
                    }
                    tally
                }));
            }
        }
        Pacing::Open { requests_per_second } => {
            // One scheduler; each scheduled request takes a free slot or is counted unsent.
            let slots = Arc::new(Semaphore::new(config.in_flight));
            let interval = Duration::from_secs_f64(1.0 / requests_per_second.max(f64::MIN_POSITIVE));
            let config = Arc::clone(&config);
            let clients = clients.clone();
            workers.push(tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(config.seed);
                let mut unsent = Tally::default();
                let mut requests = Vec::new();
                let mut next = Instant::now();
                let mut sent: u64 = 0;
                while next < until {
                    tokio::time::sleep_until(next.into()).await;
                    let scheduled = next;
                    next += interval;
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        unsent.unsent += 1;
                        continue;
                    };
                    let units = (0..units_per_request)
                        .map(|index| {
                            let key = format!("load-{}-open-{sent}-{index}", config.run_id);
                            // Slot numbers of closed-loop workers stay below MAX_IN_FLIGHT; the
                            // open-loop scheduler takes the slot after them.
                            let reservation =
                                reservation_id(config.run_nonce(), MAX_IN_FLIGHT as u64, sent, index as u64);
                            (key, next_unit(&config.mix, &config.users, &mut rng, reservation))
                        })
                        .collect();
                    let mut client = clients[(sent as usize) % clients.len()].clone();
                    let config = Arc::clone(&config);
                    sent += 1;
                    requests.push(tokio::spawn(async move {
                        let mut tally = Tally::default();
                        send(&mut client, &config, units, &mut tally, scheduled).await;
                        drop(permit);
                        tally
                    }));
                }
                for request in requests {
                    if let Ok(tally) = request.await {
                        unsent.merge(&tally);
                    }
                }
                unsent
            }));
        }
    }
    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.await.map_err(|_| LoadError::Worker)?;
        total.merge(&tally);
    }
    Ok((total, began.elapsed()))
}
