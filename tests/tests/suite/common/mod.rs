//! Helpers shared by the cross-service tests: a world of real services and typed clients, with the
//! moves an authority, a vendor, customs and buyers make, and waiting for eventual outcomes.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_testkit::{Cluster, ClusterOptions};

pub const H200: &str = "H200-SXM-141GB";
pub const NVL: &str = "H200-NVL-141GB";

/// A running cluster and clients ([`Moves`], through `Deref`).
pub struct World {
    pub cluster: Cluster,
    pub moves: Moves,
}

impl std::ops::Deref for World {
    type Target = Moves;
    fn deref(&self) -> &Moves {
        &self.moves
    }
}

impl std::ops::DerefMut for World {
    fn deref_mut(&mut self) -> &mut Moves {
        &mut self.moves
    }
}

/// Clients of the three services (acting as whichever party each call needs), and the moves the
/// parties make, for an in-process cluster or a cluster of processes alike.
pub struct Moves {
    pub lic: chipgate_testkit::LicensingClient,
    pub inv: chipgate_testkit::InventoryClient,
    pub ord: chipgate_testkit::OrdersClient,
}

pub fn rid(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl World {
    pub async fn start() -> Self {
        Self::with(ClusterOptions::default()).await
    }

    pub async fn with(options: ClusterOptions) -> Self {
        let cluster = Cluster::start_with(options).await;
        let lic = cluster.licensing_client();
        let inv = cluster.inventory_client();
        let ord = cluster.orders_client();
        World { cluster, moves: Moves { lic, inv, ord } }
    }
}

impl Moves {
    /// The moves of a cluster of processes (orders replica `i`).
    pub fn of(c: &chipgate_testkit::procs::ProcessCluster, i: usize) -> Self {
        Moves { lic: c.licensing_client(), inv: c.inventory_client(), ord: c.orders_client(i) }
    }

    pub async fn export(&mut self, sku: &str) {
        self.lic
            .grant_export_authorization(lpb::GrantExportAuthorizationRequest {
                request_id: rid("exp"),
                vendor: "nvidia".into(),
                product_sku: sku.into(),
                destination: "CN".into(),
                reference: "BIS".into(),
            })
            .await
            .unwrap();
    }

    pub async fn revoke_export(&mut self, sku: &str) {
        self.lic
            .revoke_export_authorization(lpb::RevokeExportAuthorizationRequest {
                request_id: rid("unexp"),
                product_sku: sku.into(),
                destination: "CN".into(),
                reason: "policy change".into(),
            })
            .await
            .unwrap();
    }

    pub async fn customs(&mut self, sku: &str, embargoed: bool) {
        let stance = if embargoed { lpb::ImportStance::Embargoed } else { lpb::ImportStance::Open };
        self.lic
            .set_import_policy(lpb::SetImportPolicyRequest {
                request_id: rid("pol"),
                product_sku: sku.into(),
                stance: stance as i32,
                reason: "customs notice".into(),
            })
            .await
            .unwrap();
    }

    pub async fn apply(&mut self, buyer: &str, sku: &str, qty: u64) -> String {
        self.lic
            .submit_application(lpb::SubmitApplicationRequest {
                request_id: rid("app"),
                buyer_id: buyer.into(),
                product_sku: sku.into(),
                quantity: qty,
                end_use: "AI training".into(),
                site: "DC".into(),
                destination: "CN".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .application
            .unwrap()
            .application_id
    }

    /// Publishes a wave granting each application its units; returns (wave id, licence ids in order).
    pub async fn wave(&mut self, grants: &[(&str, u64)], conditions: lpb::LicenseConditions) -> (String, Vec<String>) {
        let wave = self
            .lic
            .create_wave(lpb::CreateWaveRequest { request_id: rid("wave"), display_name: "wave".into() })
            .await
            .unwrap()
            .into_inner()
            .wave
            .unwrap();
        for (app, units) in grants {
            self.lic
                .add_wave_grant(lpb::AddWaveGrantRequest {
                    request_id: rid("grant"),
                    wave_id: wave.wave_id.clone(),
                    application_id: app.to_string(),
                    granted_units: *units,
                    conditions: Some(conditions),
                })
                .await
                .unwrap();
        }
        let p = self
            .lic
            .publish_wave(lpb::PublishWaveRequest { request_id: rid("pub"), wave_id: wave.wave_id.clone() })
            .await
            .unwrap()
            .into_inner();
        (wave.wave_id, p.licenses.into_iter().map(|l| l.license_id).collect())
    }

    /// A buyer with an active licence for `sku` (and export authorised).
    pub async fn licensed(&mut self, buyer: &str, sku: &str, units: u64) -> String {
        self.export(sku).await;
        let app = self.apply(buyer, sku, units).await;
        self.wave(&[(&app, units)], lpb::LicenseConditions::default()).await.1.remove(0)
    }

    pub async fn finalize(&mut self, license_id: &str) {
        self.lic
            .finalize_terms(lpb::FinalizeTermsRequest {
                request_id: rid("fin"),
                license_id: license_id.into(),
                conditions: None,
            })
            .await
            .unwrap();
    }

    pub async fn domestic(&mut self, buyer: &str, units: u64) {
        self.lic
            .record_domestic_purchase(lpb::RecordDomesticPurchaseRequest {
                request_id: rid("dom"),
                buyer_id: buyer.into(),
                units,
                supplier: "huawei".into(),
                evidence_ref: rid("inv"),
            })
            .await
            .unwrap();
    }

    pub async fn license(&mut self, id: &str) -> lpb::License {
        self.lic
            .get_license(lpb::GetLicenseRequest { license_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .license
            .unwrap()
    }

    pub async fn receive(&mut self, sku: &str, units: u64) {
        self.inv
            .receive_supply(ipb::ReceiveSupplyRequest {
                request_id: rid("rcv"),
                receipt_id: rid("rcpt"),
                product_sku: sku.into(),
                units,
                source: "shipment".into(),
            })
            .await
            .unwrap();
    }

    pub async fn stock(&mut self, sku: &str) -> ipb::Stock {
        self.inv.get_stock(ipb::GetStockRequest { product_sku: sku.into() }).await.unwrap().into_inner().stock.unwrap()
    }

    pub async fn place(&mut self, buyer: &str, sku: &str, units: u64) -> opb::Order {
        self.ord
            .place_order(opb::PlaceOrderRequest {
                request_id: rid("ord"),
                buyer_id: buyer.into(),
                product_sku: sku.into(),
                units,
                justification: "needed for training".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap()
    }

    pub async fn order(&mut self, id: &str) -> opb::Order {
        self.ord.get_order(opb::GetOrderRequest { order_id: id.into() }).await.unwrap().into_inner().order.unwrap()
    }

    pub async fn orders(&mut self, ids: &[String]) -> Vec<opb::Order> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.order(id).await);
        }
        out
    }

    /// Every order, oldest first.
    pub async fn all_orders(&mut self) -> Vec<opb::Order> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .ord
                .list_orders(opb::ListOrdersRequest { page_size: 1000, page_token: token, ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            out.extend(r.orders);
            if r.next_page_token.is_empty() {
                return out;
            }
            token = r.next_page_token;
        }
    }

    /// Waits until `check` holds for the orders `ids`, failing with their states after `within`.
    pub async fn until(
        &mut self,
        ids: &[String],
        within: Duration,
        check: impl Fn(&[opb::Order]) -> bool,
    ) -> Vec<opb::Order> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.orders(ids).await;
            if check(&now) {
                return now;
            }
            if Instant::now() > deadline {
                let states: Vec<(String, String, u64)> = now
                    .iter()
                    .map(|o| (o.order_id.clone(), o.state().as_str_name().to_string(), o.held_units))
                    .collect();
                panic!("timed out; orders stand at {states:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn states(orders: &[opb::Order]) -> Vec<opb::OrderState> {
    orders.iter().map(opb::Order::state).collect()
}

pub fn all_in(orders: &[opb::Order], s: opb::OrderState) -> bool {
    orders.iter().all(|o| o.state() == s)
}

pub fn reasons(o: &opb::Order) -> Vec<lpb::Condition> {
    o.reasons.iter().map(|f| f.condition()).collect()
}

pub fn count_by_state(orders: &[opb::Order]) -> HashMap<opb::OrderState, usize> {
    let mut m = HashMap::new();
    for o in orders {
        *m.entry(o.state()).or_default() += 1;
    }
    m
}
