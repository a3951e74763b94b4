//! Licensing's business metrics, read from the state when `/metrics` is scraped: the approval queue,
//! licences by state, and quota granted and used per product (what an operator watches while a wave
//! is taken up). Every replica reports the same cluster-wide figures (aggregate with `max`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use chipgate_domain::licensing::{LicenseRecord, LicenseStatus};
use chipgate_runtime::metrics::{GaugeBy1, GaugeBy2, GaugeMetric as Gauge, Sample};
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
        audit: metrics.gauge("chipgate_audit_entries", "Entries in the hash-chained audit log"),
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
        self.audit.set(keys::audit().head(&self.store).await.map_err(|e| err(&e))?.0 as i64);

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
            let ids: Vec<String> = page.iter().map(|(id, _)| keys::license(id)).collect();
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
