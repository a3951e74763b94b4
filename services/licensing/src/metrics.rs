//! Licensing's business metrics, read from the state when `/metrics` is scraped: the approval queue,
//! licences by state, and quota granted and used per product (what an operator watches while a wave
//! is taken up). Every replica reports the same cluster-wide figures (aggregate with `max`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use chipgate_domain::ids::LicenceId;
use chipgate_domain::licensing::{LicenseRecord, LicenseStatus};
use chipgate_proto::licensing::v1 as pb;
use chipgate_runtime::metrics::{
    CounterBy1, CounterMetric as Counter, GaugeBy1, GaugeBy2, GaugeMetric as Gauge, Sample,
};
use chipgate_runtime::{Metrics, records};
use chipgate_state::{Backend, Store};

use crate::keys;

/// Licences read per page while summing quota.
const PAGE: usize = 1000;

/// The gauges and what fills them.
pub(crate) struct Sampler {
    store: Store,
    queue: Gauge,
    licences: GaugeBy1,
    quota: GaugeBy2,
    audit: Gauge,
}

/// Registers licensing's gauges in `metrics` and the sampler that fills them.
pub(crate) fn register(metrics: &Metrics, store: Store) {
    let sampler = Sampler {
        store,
        queue: metrics.gauge("chipgate_approval_queue_length", "Applications waiting in the approval queue"),
        licences: metrics.gauge_by("chipgate_licences", "Licences by stored state"),
        quota: metrics.gauge_by2(
            "chipgate_licence_quota_units",
            "Quota units per product: granted (by licences not revoked), used (reserved or confirmed by \
             orders) and confirmed",
        ),
        audit: metrics.gauge("chipgate_audit_entries", "Entries in the hash-chained audit log (all chains)"),
    };
    metrics.add_sampler(sampler);
}

fn status_name(s: i32) -> &'static str {
    match LicenseStatus::try_from(s).unwrap_or(LicenseStatus::Unspecified) {
        LicenseStatus::Unspecified => "UNSPECIFIED",
        LicenseStatus::PendingTerms => "PENDING_TERMS",
        LicenseStatus::Active => "ACTIVE",
        LicenseStatus::Suspended => "SUSPENDED",
        LicenseStatus::Revoked => "REVOKED",
    }
}

impl Sampler {
    async fn read(&self) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        self.queue.set(self.store.zcard(&keys::queue()).await.map_err(|e| err(&e))? as i64);
        let mut entries = 0u64;
        let products = chipgate_contract::licensing_products::all(&self.store).await.map_err(|e| err(&e))?;
        for (_, chain) in keys::audit_chains(&products) {
            entries += chain.head(&self.store).await.map_err(|e| err(&e))?.0;
        }
        self.audit.set(entries as i64);

        let mut by_state: BTreeMap<&'static str, i64> =
            ["PENDING_TERMS", "ACTIVE", "SUSPENDED", "REVOKED"].into_iter().map(|s| (s, 0)).collect();
        let mut quota: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        let mut start = 0i64;
        loop {
            let page = self
                .store
                .zrange(&keys::licenses(), start, start + PAGE as i64 - 1, false)
                .await
                .map_err(|e| err(&e))?;
            if page.is_empty() {
                break;
            }
            // The index lists ids licensing handed out.
            let ids: Vec<String> =
                page.iter().filter_map(|(id, _)| keys::license(&LicenceId::from_trusted(id.as_str()))).collect();
            for (_, l) in
                records::load_many::<LicenseRecord>(&self.store, &ids).await.map_err(|e| err(&e))?.into_iter().flatten()
            {
                *by_state.entry(status_name(l.status)).or_default() += 1;
                let sku = l.product_sku.clone();
                if !matches!(LicenseStatus::try_from(l.status), Ok(LicenseStatus::Revoked)) {
                    *quota.entry((sku.clone(), "granted")).or_default() += l.granted as i64;
                }
                *quota.entry((sku.clone(), "used")).or_default() += l.used as i64;
                *quota.entry((sku, "confirmed")).or_default() += l.confirmed as i64;
            }
            if page.len() < PAGE {
                break;
            }
            start += PAGE as i64;
        }
        for (state, n) in by_state {
            self.licences.get_or_create(&[("state", state.to_string())]).set(n);
        }
        for ((sku, kind), n) in quota {
            self.quota.get_or_create(&[("product", sku), ("kind", kind.to_string())]).set(n);
        }
        Ok(())
    }
}

impl Sample for Sampler {
    fn sample(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(self.read())
    }
}

/// How often quota calls were decided without reading first ([`crate::worlds`]).
#[derive(Clone)]
pub(crate) struct QuotaCounters {
    /// Calls committed from the world as this replica last left it.
    pub unread: Counter,
    /// Calls planned so whose commit found something changed elsewhere (then read and decided again).
    pub unread_missed: Counter,
    /// Calls that lost a race to another replica's commit and took the product's quota turn.
    pub turns_taken: Counter,
    /// Calls that found the turn taken by another replica and gave way.
    pub turns_given: Counter,
}

impl QuotaCounters {
    pub(crate) fn register(metrics: &Metrics) -> Self {
        QuotaCounters {
            unread: metrics.counter(
                "chipgate_quota_calls_unread",
                "Quota calls committed from the product's world as this replica last left it, without reading it first",
            ),
            unread_missed: metrics.counter(
                "chipgate_quota_calls_unread_missed",
                "Quota calls decided without reading whose commit found the world changed elsewhere (then read and \
                 decided again)",
            ),
            turns_taken: metrics.counter(
                "chipgate_quota_turns_taken",
                "Quota calls that lost a race to another replica's commit and made replicas deciding without reading \
                 read first (a loser's turn)",
            ),
            turns_given: metrics.counter(
                "chipgate_quota_turns_given",
                "Quota calls that found the product's quota turn taken by another replica and waited for it to \
                 commit first",
            ),
        }
    }
}

/// What periodic audit checkpoints leave outside Redis: per chain its sequence and a short digest of
/// its head (a truncation shows as a sequence going down, a rewrite as the digest changing at the
/// same sequence), when the last one was taken, and how many chains were seen moving backwards.
#[derive(Clone)]
pub(crate) struct CheckpointMetrics {
    sequence: GaugeBy1,
    digest: GaugeBy1,
    time: Gauge,
    taken: Counter,
    failures: Counter,
    rollbacks: CounterBy1,
}

impl CheckpointMetrics {
    pub(crate) fn register(metrics: &Metrics) -> Self {
        CheckpointMetrics {
            sequence: metrics.gauge_by(
                "chipgate_audit_chain_sequence",
                "Sequence of each audit chain's head at the last periodic checkpoint",
            ),
            digest: metrics.gauge_by(
                "chipgate_audit_chain_head_digest",
                "First 48 bits of each audit chain's head hash at the last periodic checkpoint",
            ),
            time: metrics
                .gauge("chipgate_audit_checkpoint_time_seconds", "Unix time of the last periodic audit checkpoint"),
            taken: metrics.counter("chipgate_audit_checkpoints", "Periodic audit checkpoints taken"),
            failures: metrics.counter(
                "chipgate_audit_checkpoint_failures",
                "Periodic audit checkpoints that could not be taken (state unreachable, corrupt head)",
            ),
            rollbacks: metrics.counter_by(
                "chipgate_audit_chain_rollbacks",
                "Audit chains whose head moved backwards between two periodic checkpoints (a lower sequence, \
                 or the same sequence with another hash): the log was truncated or rewritten",
            ),
        }
    }

    /// Ships a checkpoint to the logs and the gauges, and reports chains that moved backwards since
    /// `previous`.
    pub(crate) fn record(&self, cp: &pb::AuditCheckpoint, previous: Option<&pb::AuditCheckpoint>) {
        self.taken.inc();
        let (secs, nanos) = cp.time.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
        self.time.set(secs);
        let mut heads = String::new();
        for c in &cp.chains {
            self.sequence.get_or_create(&[("chain", c.chain.clone())]).set(c.sequence as i64);
            self.digest.get_or_create(&[("chain", c.chain.clone())]).set(crate::checkpoint::short_digest(&c.head_hash));
            if !heads.is_empty() {
                heads.push(' ');
            }
            heads.push_str(&format!("{}={}:{}", c.chain, c.sequence, c.head_hash));
        }
        let signature = hex(&cp.signature);
        // Everything needed to check the signature offline, in the canonical form's own notation
        // (`checkpoint_time` as in its `time` line; `chains` as `name=sequence:head`, space-separated).
        tracing::info!(
            checkpoint_time = %format!("{secs}.{nanos:09}"),
            root = %cp.root,
            key_id = %cp.key_id,
            signature = %signature,
            chains = %heads,
            signed = !cp.signature.is_empty(),
            "audit checkpoint"
        );
        let Some(previous) = previous else { return };
        for before in &previous.chains {
            let now = cp.chains.iter().find(|c| c.chain == before.chain);
            let (seq, hash) = now.map_or((0, ""), |c| (c.sequence, c.head_hash.as_str()));
            if seq < before.sequence || (seq == before.sequence && hash != before.head_hash) {
                self.rollbacks.get_or_create(&[("chain", before.chain.clone())]).inc();
                tracing::error!(
                    chain = %before.chain,
                    was_sequence = before.sequence,
                    was_head = %before.head_hash,
                    now_sequence = seq,
                    now_head = %hash,
                    "audit chain moved backwards since the previous checkpoint: the log was truncated or rewritten"
                );
            }
        }
    }

    /// Counts a checkpoint that could not be taken.
    pub(crate) fn failed(&self) {
        self.failures.inc();
    }
}

/// Lower-case hex of bytes.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
