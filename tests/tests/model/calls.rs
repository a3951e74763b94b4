//! Calls as a careful client makes them: each with a deadline and the request id in its `x-request-id`
//! header (so the audit log names it); a call whose outcome is unknown (timed out, UNAVAILABLE,
//! ABORTED by contention, a replica killed under it) is sent again unchanged — same request id — until
//! it has a definite answer. On top of that the checker sometimes sends an acknowledged call again
//! (it must replay the first answer) or the same call twice at once (both must get one answer), and
//! counts every call by kind and outcome.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Code, Status};

/// Every call's deadline (sent as grpc-timeout, and enforced by the client too).
pub const DEADLINE: Duration = Duration::from_secs(5);
/// How long a call may stay without a definite answer before the checker gives up on it.
pub const RESOLVE_WITHIN: Duration = Duration::from_secs(60);

/// A request with the deadline and the request id header.
pub fn req<T>(request_id: &str, m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(DEADLINE);
    if !request_id.is_empty()
        && let Ok(v) = request_id.parse()
    {
        r.metadata_mut().insert(chipgate_runtime::context::REQUEST_ID_HEADER, v);
    }
    r
}

/// How an acknowledged call is exercised further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Sent once (and again only while its outcome is unknown).
    Once,
    /// Sent, then — once acknowledged — sent again with the same request id: the answer must be the
    /// first one.
    Replay,
    /// Sent twice at the same moment with the same request id (to different replicas where there are
    /// several): both must come back with the same answer.
    Twice,
}

impl Mode {
    pub fn pick(rng: &mut fastrand::Rng) -> Mode {
        match rng.u8(..100) {
            0..=11 => Mode::Replay,
            12..=21 => Mode::Twice,
            _ => Mode::Once,
        }
    }
}

/// Operations by kind and outcome, and the calls that needed resending.
#[derive(Debug, Default)]
pub struct Stats {
    /// (kind, outcome) → count.
    pub outcomes: BTreeMap<(String, String), u64>,
    /// kind → attempts whose outcome was unknown and were sent again.
    pub resent: BTreeMap<String, u64>,
    /// Why those attempts were unknown.
    pub unknown_why: BTreeMap<String, u64>,
    /// Replays and duplicate sends checked.
    pub replays: u64,
    pub twins: u64,
}

pub type SharedStats = Arc<Mutex<Stats>>;

/// The outcome label of a definite answer.
pub fn label<T>(r: &Result<T, Status>) -> String {
    match r {
        Ok(_) => "OK".to_string(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// Whether a status is a definite answer (the call took effect or never will, as sent).
fn definite(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unauthenticated
            | Code::ResourceExhausted
    )
}

/// Sends `send(attempt)` until it answers definitely. `attempt` grows with each resend (callers use it to
/// pick another orders replica). Server faults (INTERNAL, UNKNOWN) are reported in `faults` and resent.
pub async fn definite_answer<T, F, Fut>(
    stats: &SharedStats,
    faults: &Arc<Mutex<Vec<String>>>,
    kind: &str,
    lane: usize,
    send: &F,
) -> Result<T, Status>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let began = Instant::now();
    let mut attempt = lane * 7;
    loop {
        let why = match tokio::time::timeout(DEADLINE + Duration::from_millis(500), send(attempt)).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s)) if definite(s.code()) => return Err(s),
            Ok(Err(s)) => {
                // UNKNOWN is what a connection cut under a call looks like (a killed replica); INTERNAL
                // and friends are the server's own faults.
                if matches!(s.code(), Code::Internal | Code::DataLoss | Code::Unimplemented) {
                    faults.lock().unwrap().push(format!("{kind}: server fault {:?}: {}", s.code(), s.message()));
                }
                format!("{:?}", s.code())
            }
            Err(_) => "client deadline".to_string(),
        };
        {
            let mut st = stats.lock().unwrap();
            *st.resent.entry(kind.to_string()).or_default() += 1;
            *st.unknown_why.entry(why.clone()).or_default() += 1;
        }
        if began.elapsed() > RESOLVE_WITHIN {
            faults.lock().unwrap().push(format!("{kind}: no definite answer within {RESOLVE_WITHIN:?} (last: {why})"));
            return Err(Status::deadline_exceeded(format!("unresolved: {why}")));
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(0..200))).await;
    }
}

/// Sends a call as `mode` says and returns its (first) definite answer, booked under `kind`. `same`
/// tells whether two acknowledged answers are the same answer (e.g. the same order id); a mismatch,
/// or a call sent twice at once that got two different outcomes, is reported in `faults`.
pub async fn call<T, F, Fut, K>(
    stats: &SharedStats,
    faults: &Arc<Mutex<Vec<String>>>,
    kind: &str,
    mode: Mode,
    send: F,
    same: K,
) -> Result<T, Status>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    K: Fn(&T, &T) -> bool,
{
    let out = match mode {
        Mode::Once => definite_answer(stats, faults, kind, 0, &send).await,
        Mode::Replay => {
            let first = definite_answer(stats, faults, kind, 0, &send).await;
            if let Ok(a) = &first {
                let again = definite_answer(stats, faults, kind, 1, &send).await;
                stats.lock().unwrap().replays += 1;
                match &again {
                    Ok(b) if same(a, b) => {}
                    Ok(_) => faults
                        .lock()
                        .unwrap()
                        .push(format!("{kind}: a retry with the same request id answered differently")),
                    Err(s) => faults.lock().unwrap().push(format!(
                        "{kind}: acknowledged, but a retry with the same request id was refused: {:?} {}",
                        s.code(),
                        s.message()
                    )),
                }
            }
            first
        }
        Mode::Twice => {
            let (a, b) = tokio::join!(
                definite_answer(stats, faults, kind, 0, &send),
                definite_answer(stats, faults, kind, 1, &send)
            );
            stats.lock().unwrap().twins += 1;
            match (&a, &b) {
                (Ok(x), Ok(y)) if same(x, y) => {}
                (Ok(_), Ok(_)) => faults
                    .lock()
                    .unwrap()
                    .push(format!("{kind}: the same call sent twice at once got two different answers")),
                (Err(x), Err(y)) if x.code() == y.code() => {}
                _ => faults.lock().unwrap().push(format!(
                    "{kind}: the same call sent twice at once got {} and {} ({})",
                    label(&a),
                    label(&b),
                    [&a, &b]
                        .iter()
                        .filter_map(|r| r.as_ref().err())
                        .map(|s| s.message().to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
            }
            if a.is_ok() { a } else { b }
        }
    };
    let mut st = stats.lock().unwrap();
    *st.outcomes.entry((kind.to_string(), label(&out))).or_default() += 1;
    out
}
