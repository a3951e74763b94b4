//! Licensing behaviour, run on both state backends (in memory and a real redis-server): the queue,
//! waves, licence states and conditions, quota under concurrency, generations, gates, events and the
//! audit chain. Calls go through the service's gRPC trait (no network; the cross-service suite covers
//! the wire).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use chipgate_domain::ids::{BuyerId, LicenceId, OrderId, Sku, WaveId};
use chipgate_licensing::{Licensing, keys};
use chipgate_proto::licensing::v1 as pb;
use chipgate_proto::licensing::v1::licensing_service_server::LicensingService;
use chipgate_state::{Backend, Record, Store, backend_tests};
use prost::Message;
use tonic::{Code, Request};
use tonic_types::StatusExt;

/// The products these tests name, as inventory's catalogue holds them (applications must name one).
const CATALOGUE: [&str; 3] = ["H200", "H200-NVL", "eu:H200"];

/// A licensing service on `store`, with the catalogue in place.
async fn service(store: Store) -> Licensing {
    // Each product's record lives in its own partition: one transaction each.
    for sku in CATALOGUE {
        let mut t = chipgate_state::Txn::new();
        t.put(chipgate_contract::catalogue::product(&Sku::from_trusted(sku)), b"product".to_vec());
        store.commit(&t).await.unwrap();
    }
    Licensing::new(store)
}

/// Every licensing event stream: the desk's and each product's.
async fn streams(store: &Store) -> Vec<String> {
    let mut out = vec![chipgate_contract::streams::licensing()];
    for sku in chipgate_contract::licensing_products::all(store).await.unwrap() {
        out.push(chipgate_contract::streams::licensing_product(&sku));
    }
    out
}

/// Events in every licensing stream.
async fn event_count(store: &Store) -> u64 {
    let mut n = 0;
    for s in streams(store).await {
        n += store.xlen(&s).await.unwrap();
    }
    n
}

/// Every licensing event, stream by stream.
async fn all_events(store: &Store) -> Vec<pb::LicensingEvent> {
    let mut out = Vec::new();
    for s in streams(store).await {
        for e in store.xrange(&s, None, 10_000).await.unwrap() {
            out.push(pb::LicensingEvent::decode(e.field("e").unwrap()).unwrap());
        }
    }
    out
}

fn rid() -> String {
    format!("r-{}", fastrand_like())
}

fn fastrand_like() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn submit(svc: &Licensing, buyer: &str, sku: &str, qty: u64) -> pb::Application {
    svc.submit_application(Request::new(pb::SubmitApplicationRequest {
        request_id: rid(),
        buyer_id: buyer.into(),
        product_sku: sku.into(),
        quantity: qty,
        end_use: "LLM training".into(),
        site: "Ulanqab DC".into(),
        destination: String::new(),
    }))
    .await
    .unwrap()
    .into_inner()
    .application
    .unwrap()
}

/// Drafts and publishes a wave granting each application the given units and conditions.
async fn publish(svc: &Licensing, grants: &[(&str, u64, pb::LicenseConditions)]) -> pb::PublishWaveResponse {
    let wave = svc
        .create_wave(Request::new(pb::CreateWaveRequest { request_id: rid(), display_name: "wave".into() }))
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    for (app, units, c) in grants {
        svc.add_wave_grant(Request::new(pb::AddWaveGrantRequest {
            request_id: rid(),
            wave_id: wave.wave_id.clone(),
            application_id: app.to_string(),
            granted_units: *units,
            conditions: Some(*c),
        }))
        .await
        .unwrap();
    }
    svc.publish_wave(Request::new(pb::PublishWaveRequest { request_id: rid(), wave_id: wave.wave_id }))
        .await
        .unwrap()
        .into_inner()
}

/// Adds (or replaces) application `app`'s grant of `units` (no conditions) to wave `wave_id`, as the
/// call `request_id`.
async fn grant(svc: &Licensing, wave_id: &str, app: &str, units: u64, request_id: String) -> pb::AddWaveGrantResponse {
    svc.add_wave_grant(Request::new(pb::AddWaveGrantRequest {
        request_id,
        wave_id: wave_id.into(),
        application_id: app.into(),
        granted_units: units,
        conditions: None,
    }))
    .await
    .unwrap()
    .into_inner()
}

/// Removes application `app`'s grant from wave `wave_id`.
async fn ungrant(svc: &Licensing, wave_id: &str, app: &str) -> Result<pb::RemoveWaveGrantResponse, tonic::Status> {
    let req = pb::RemoveWaveGrantRequest { request_id: rid(), wave_id: wave_id.into(), application_id: app.into() };
    svc.remove_wave_grant(Request::new(req)).await.map(tonic::Response::into_inner)
}

/// Wave `wave_id` as GetWave shows it.
async fn wave_of(svc: &Licensing, wave_id: &str) -> pb::Wave {
    svc.get_wave(Request::new(pb::GetWaveRequest { wave_id: wave_id.into() })).await.unwrap().into_inner().wave.unwrap()
}

/// Confirms order `order`'s H200 quota of `generation`.
async fn confirm(svc: &Licensing, order: &str, generation: u64) {
    svc.confirm_quota(Request::new(pb::ConfirmQuotaRequest {
        request_id: rid(),
        order_id: order.into(),
        generation,
        product_sku: "H200".into(),
    }))
    .await
    .unwrap();
}

async fn authorize_export(svc: &Licensing, sku: &str) {
    svc.grant_export_authorization(Request::new(pb::GrantExportAuthorizationRequest {
        request_id: rid(),
        vendor: "nvidia".into(),
        product_sku: sku.into(),
        destination: "CN".into(),
        reference: "BIS-2026-001".into(),
    }))
    .await
    .unwrap();
}

/// A buyer with an active licence of `units` for H200 and export authorised.
async fn licensed(svc: &Licensing, buyer: &str, units: u64, c: pb::LicenseConditions) -> pb::License {
    authorize_export(svc, "H200").await;
    let app = submit(svc, buyer, "H200", units).await;
    publish(svc, &[(&app.application_id, units, c)]).await.licenses.remove(0)
}

fn item(order: &str, generation: u64, buyer: &str, units: u64) -> pb::QuotaItem {
    pb::QuotaItem {
        order_id: order.into(),
        generation,
        buyer_id: buyer.into(),
        units,
        justification: "needed".into(),
        queued_behind: String::new(),
        judge_only: false,
    }
}

/// Order `order`'s quota reservation of H200.
async fn reservation(svc: &Licensing, order: &str) -> pb::QuotaReservation {
    svc.get_quota_reservation(Request::new(pb::GetQuotaReservationRequest {
        order_id: order.into(),
        product_sku: "H200".into(),
    }))
    .await
    .unwrap()
    .into_inner()
    .reservation
    .unwrap()
}

async fn batch(svc: &Licensing, items: Vec<pb::QuotaItem>) -> Vec<pb::QuotaItemResult> {
    batch_of(svc, "H200", items).await
}

async fn license(svc: &Licensing, id: &str) -> pb::License {
    svc.get_license(Request::new(pb::GetLicenseRequest { license_id: id.into() }))
        .await
        .unwrap()
        .into_inner()
        .license
        .unwrap()
}

fn conditions(r: &pb::QuotaItemResult) -> Vec<pb::Condition> {
    conditions_of(&r.failures)
}

fn conditions_of(failures: &[pb::ConditionFailure]) -> Vec<pb::Condition> {
    failures.iter().map(|f| f.condition()).collect()
}

async fn queue_ids(svc: &Licensing) -> Vec<(String, u64)> {
    svc.list_queue(Request::new(pb::ListQueueRequest { page_size: 0, page_token: String::new() }))
        .await
        .unwrap()
        .into_inner()
        .applications
        .into_iter()
        .map(|a| (a.application_id, a.queue_position))
        .collect()
}

/// Ids may contain the key separator: buyer `acme`'s application for `eu:H200` and buyer `acme:eu`'s
/// for `H200` are two applications (their keys once collided: the second was refused as a duplicate of
/// the first, naming another buyer's application).
async fn ids_with_separators_never_collide(store: Store) {
    let svc = service(store).await;
    let a = submit(&svc, "acme", "eu:H200", 10).await;
    let b = submit(&svc, "acme:eu", "H200", 10).await;
    assert_ne!(a.application_id, b.application_id);
    assert_eq!((a.buyer_id.as_str(), b.buyer_id.as_str()), ("acme", "acme:eu"));
    assert_eq!((a.queue_position, b.queue_position), (1, 2));
}

async fn applications_queue_in_order_with_one_open_each(store: Store) {
    let svc = service(store).await;
    let a = submit(&svc, "bytedance", "H200", 200_000).await;
    let b = submit(&svc, "alibaba", "H200", 150_000).await;
    let c = submit(&svc, "tencent", "H200", 100_000).await;
    assert_eq!((a.queue_position, b.queue_position, c.queue_position), (1, 2, 3));
    assert_eq!(a.state(), pb::ApplicationState::Queued);

    // One open application per buyer and product.
    let dup = svc
        .submit_application(Request::new(pb::SubmitApplicationRequest {
            request_id: rid(),
            buyer_id: "bytedance".into(),
            product_sku: "H200".into(),
            quantity: 5,
            end_use: "x".into(),
            site: "y".into(),
            destination: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert_eq!(dup.get_error_details().resource_info().unwrap().resource_name, a.application_id);
    // Another product is fine.
    submit(&svc, "bytedance", "H200-NVL", 10).await;

    // Withdraw the middle one: the others keep their order.
    let w = svc
        .withdraw_application(Request::new(pb::WithdrawApplicationRequest {
            request_id: rid(),
            application_id: b.application_id.clone(),
            reason: "changed plans".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    assert_eq!((w.state(), w.queue_position), (pb::ApplicationState::Withdrawn, 0));
    let q = queue_ids(&svc).await;
    assert_eq!(q[0], (a.application_id.clone(), 1));
    assert_eq!(q[1], (c.application_id.clone(), 2));
    // The buyer may apply again now.
    let b2 = submit(&svc, "alibaba", "H200", 1).await;

    // Rejection needs a reason and only works on queued applications.
    let no_reason = svc
        .reject_application(Request::new(pb::RejectApplicationRequest {
            request_id: rid(),
            application_id: c.application_id.clone(),
            reason: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    assert_eq!(no_reason.get_error_details().bad_request().unwrap().field_violations[0].field, "reason");
    let again = svc
        .reject_application(Request::new(pb::RejectApplicationRequest {
            request_id: rid(),
            application_id: b.application_id.clone(),
            reason: "nope".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);

    // The authority moves the last application to the front.
    let moved = svc
        .move_queued_application(Request::new(pb::MoveQueuedApplicationRequest {
            request_id: rid(),
            application_id: b2.application_id.clone(),
            position: 1,
        }))
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    assert_eq!(moved.queue_position, 1);
    let order: Vec<String> = queue_ids(&svc).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(order[0], b2.application_id);
    assert_eq!(order[1], a.application_id);
    // A new submission still joins at the back after a renumbering.
    let d = submit(&svc, "baidu", "H200", 7).await;
    assert_eq!(d.queue_position, order.len() as u64 + 1);
}

async fn submissions_are_idempotent_per_request_id(store: Store) {
    let svc = service(store).await;
    let req = pb::SubmitApplicationRequest {
        request_id: "same-request".into(),
        buyer_id: "tencent".into(),
        product_sku: "H200".into(),
        quantity: 10,
        end_use: "inference".into(),
        site: "Shenzhen".into(),
        destination: "CN".into(),
    };
    let first = svc.submit_application(Request::new(req.clone())).await.unwrap().into_inner();
    let second = svc.submit_application(Request::new(req.clone())).await.unwrap().into_inner();
    assert_eq!(first, second, "a retry returns the same application");
    assert_eq!(queue_ids(&svc).await.len(), 1, "and creates nothing new");
    let mut other = req;
    other.quantity = 11;
    let err = svc.submit_application(Request::new(other)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.get_error_details().bad_request().unwrap().field_violations[0].field, "request_id");
}

async fn waves_publish_atomically_and_never_change(store: Store) {
    let svc = service(store.clone()).await;
    let a = submit(&svc, "bytedance", "H200", 250_000).await;
    let b = submit(&svc, "alibaba", "H200", 150_000).await;
    let c = submit(&svc, "zhipu", "H200", 50_000).await;
    let pending = pb::LicenseConditions { terms_pending: true, domestic_ratio_bps: 2500, ..Default::default() };

    // Granting more than applied for is refused, and so is a draft grant of a non-queued application.
    let wave = svc
        .create_wave(Request::new(pb::CreateWaveRequest { request_id: rid(), display_name: "Wave 1".into() }))
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    let too_much = svc
        .add_wave_grant(Request::new(pb::AddWaveGrantRequest {
            request_id: rid(),
            wave_id: wave.wave_id.clone(),
            application_id: a.application_id.clone(),
            granted_units: 250_001,
            conditions: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(too_much.code(), Code::InvalidArgument);

    for (app, units) in [(&a, 250_000), (&b, 150_000), (&c, 10)] {
        svc.add_wave_grant(Request::new(pb::AddWaveGrantRequest {
            request_id: rid(),
            wave_id: wave.wave_id.clone(),
            application_id: app.application_id.clone(),
            granted_units: units,
            conditions: Some(pending),
        }))
        .await
        .unwrap();
    }
    svc.remove_wave_grant(Request::new(pb::RemoveWaveGrantRequest {
        request_id: rid(),
        wave_id: wave.wave_id.clone(),
        application_id: c.application_id.clone(),
    }))
    .await
    .unwrap();

    // A granted application that leaves the queue before publication blocks it; nothing changes.
    let d = submit(&svc, "tencent", "H200", 100_000).await;
    svc.add_wave_grant(Request::new(pb::AddWaveGrantRequest {
        request_id: rid(),
        wave_id: wave.wave_id.clone(),
        application_id: d.application_id.clone(),
        granted_units: 100_000,
        conditions: Some(pending),
    }))
    .await
    .unwrap();
    svc.withdraw_application(Request::new(pb::WithdrawApplicationRequest {
        request_id: rid(),
        application_id: d.application_id.clone(),
        reason: String::new(),
    }))
    .await
    .unwrap();
    let events_before = event_count(&store).await;
    let blocked = svc
        .publish_wave(Request::new(pb::PublishWaveRequest { request_id: rid(), wave_id: wave.wave_id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), Code::FailedPrecondition);
    let pf = blocked.get_error_details();
    assert_eq!(pf.precondition_failure().unwrap().violations[0].subject, d.application_id);
    assert_eq!(event_count(&store).await, events_before, "a refused publish changes nothing");
    assert_eq!(queue_ids(&svc).await.len(), 3);

    svc.remove_wave_grant(Request::new(pb::RemoveWaveGrantRequest {
        request_id: rid(),
        wave_id: wave.wave_id.clone(),
        application_id: d.application_id.clone(),
    }))
    .await
    .unwrap();
    let published = svc
        .publish_wave(Request::new(pb::PublishWaveRequest { request_id: rid(), wave_id: wave.wave_id.clone() }))
        .await
        .unwrap()
        .into_inner();
    let w = published.wave.unwrap();
    assert_eq!(w.state(), pb::WaveState::Published);
    assert_eq!(w.total_granted_units, 400_000);
    assert_eq!(published.licenses.len(), 2);
    assert!(published.licenses.iter().all(|l| l.state() == pb::LicenseState::PendingTerms));
    assert_eq!(published.licenses[0].buyer_id, "bytedance");
    assert_eq!(published.licenses[0].granted_units, 250_000);

    // Granted applications left the queue; the rest kept their order.
    let q = queue_ids(&svc).await;
    assert_eq!(q, vec![(c.application_id.clone(), 1)]);
    let a_now = svc
        .get_application(Request::new(pb::GetApplicationRequest { application_id: a.application_id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    assert_eq!(a_now.state(), pb::ApplicationState::Granted);
    assert_eq!(a_now.license_id, published.licenses[0].license_id);

    // Published waves never change.
    let late = svc
        .add_wave_grant(Request::new(pb::AddWaveGrantRequest {
            request_id: rid(),
            wave_id: wave.wave_id.clone(),
            application_id: c.application_id.clone(),
            granted_units: 1,
            conditions: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let twice = svc
        .publish_wave(Request::new(pb::PublishWaveRequest { request_id: rid(), wave_id: wave.wave_id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);

    // The publication is one event per product naming every licence of the product, in the
    // product's stream; nothing is left pending.
    assert!(w.pending_products.is_empty(), "{:?}", w.pending_products);
    let published_events: Vec<pb::WavePublished> = all_events(&store)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(pb::licensing_event::Kind::WavePublished(p)) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(published_events.len(), 1);
    assert_eq!(published_events[0].licenses.len(), 2);
    let in_product =
        store.xlen(&chipgate_contract::streams::licensing_product(&Sku::from_trusted("H200"))).await.unwrap();
    assert!(in_product >= 1, "the wave's licences of H200 are announced in H200's stream");
}

async fn licence_states_gate_quota(store: Store) {
    let svc = service(store).await;
    let lic = licensed(
        &svc,
        "bytedance",
        1000,
        pb::LicenseConditions { terms_pending: true, per_order_cap: 400, ..Default::default() },
    )
    .await;
    let r = batch(&svc, vec![item("o1", 1, "bytedance", 100)]).await;
    assert_eq!(conditions(&r[0]), vec![pb::Condition::TermsFinal]);
    assert!(!r[0].rejectable);

    svc.finalize_terms(Request::new(pb::FinalizeTermsRequest {
        request_id: rid(),
        license_id: lic.license_id.clone(),
        conditions: None,
    }))
    .await
    .unwrap();
    let r = batch(&svc, vec![item("o1", 1, "bytedance", 100), item("o2", 1, "bytedance", 500)]).await;
    assert!(r[0].reservation.is_some());
    assert_eq!(conditions(&r[1]), vec![pb::Condition::PerOrderCap]);
    assert!(r[1].rejectable, "above the cap of the only licence: reject, don't wait");
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 100);

    svc.suspend_license(Request::new(pb::SuspendLicenseRequest {
        request_id: rid(),
        license_id: lic.license_id.clone(),
        reason: "inspection".into(),
    }))
    .await
    .unwrap();
    let r = batch(&svc, vec![item("o3", 1, "bytedance", 10)]).await;
    assert_eq!(conditions(&r[0]), vec![pb::Condition::LicenseInForce]);
    // Confirming under a suspended licence is refused.
    let c = svc
        .confirm_quota(Request::new(pb::ConfirmQuotaRequest {
            request_id: rid(),
            order_id: "o1".into(),
            generation: 1,
            product_sku: "H200".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(c.code(), Code::FailedPrecondition);
    let bad = svc
        .suspend_license(Request::new(pb::SuspendLicenseRequest {
            request_id: rid(),
            license_id: lic.license_id.clone(),
            reason: "again".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::FailedPrecondition);

    svc.reinstate_license(Request::new(pb::ReinstateLicenseRequest {
        request_id: rid(),
        license_id: lic.license_id.clone(),
        reason: "cleared".into(),
    }))
    .await
    .unwrap();
    assert!(batch(&svc, vec![item("o3", 1, "bytedance", 10)]).await[0].reservation.is_some());
    svc.revoke_license(Request::new(pb::RevokeLicenseRequest {
        request_id: rid(),
        license_id: lic.license_id.clone(),
        reason: "fraud".into(),
    }))
    .await
    .unwrap();
    let l = license(&svc, &lic.license_id).await;
    assert_eq!(l.state(), pb::LicenseState::Revoked);
    let r = batch(&svc, vec![item("o4", 1, "bytedance", 10)]).await;
    assert!(conditions(&r[0]).contains(&pb::Condition::License));
    assert!(!r[0].rejectable, "a revoked licence leaves the order waiting for a new one, not rejected");
}

async fn quota_is_never_exceeded_under_concurrency(store: Store) {
    let svc = service(store.clone()).await;
    // Two replicas, so calls for the product are not all queued behind one replica's lock: their
    // commits race for the licence and for the product's audit chain, whose head each attempt reads
    // beside its own reads (a head another replica moved since fails the commit, which runs again).
    let replicas = [svc.clone(), Licensing::new(store)];
    let lic = licensed(&svc, "bytedance", 1000, pb::LicenseConditions::default()).await;
    // 24 tasks × 4 orders × 30 units = 2,880 units asked for against 1,000; every call is sent twice
    // (a client retry).
    let mut handles = Vec::new();
    for t in 0..24 {
        let svc = replicas[t % 2].clone();
        handles.push(tokio::spawn(async move {
            let mut granted = Vec::new();
            for k in 0..4 {
                // Half the orders numbered as the orders service numbers them (their reservations
                // are fields of the product's reservation hashes, several to a hash), half not
                // (a key each).
                let order = if t % 2 == 0 { format!("ord-H200-{}", t * 4 + k) } else { format!("t{t}-o{k}") };
                for _attempt in 0..2 {
                    let r = batch(&svc, vec![item(&order, 1, "bytedance", 30)]).await.remove(0).reservation;
                    if let Some(r) = r {
                        granted.push((r.order_id, r.units));
                    }
                }
            }
            granted
        }));
    }
    let mut per_order: HashMap<String, u64> = HashMap::new();
    for h in handles {
        for (order, units) in h.await.unwrap() {
            per_order.insert(order, units);
        }
    }
    let l = license(&svc, &lic.license_id).await;
    let total: u64 = per_order.values().sum();
    assert_eq!(l.used_units, total, "quota used equals the sum over distinct orders: retries never double-count");
    assert!(l.used_units <= 1000, "never over-licensed: {}", l.used_units);
    assert_eq!(l.used_units, 990, "33 orders of 30 fit into 1,000");
    for (order, _) in per_order {
        assert_eq!(reservation(&svc, &order).await.state(), pb::ReservationState::Held);
    }
    // Every decision is on the chain once, linked to the one before.
    let v = svc.verify_audit_log(Request::new(pb::VerifyAuditLogRequest::default())).await.unwrap().into_inner();
    assert!(v.valid, "{}", v.problem);
}

async fn batches_serve_in_order_without_overtaking(store: Store) {
    let svc = service(store).await;
    licensed(&svc, "bytedance", 100, pb::LicenseConditions::default()).await;
    let app = submit(&svc, "alibaba", "H200", 100).await;
    publish(&svc, &[(&app.application_id, 100, pb::LicenseConditions::default())]).await;
    let r = batch(
        &svc,
        vec![
            item("b1", 1, "bytedance", 60),
            item("b2", 1, "bytedance", 50),
            item("a1", 1, "alibaba", 100),
            item("b3", 1, "bytedance", 10),
        ],
    )
    .await;
    assert!(r[0].reservation.is_some());
    assert_eq!(conditions(&r[1]), vec![pb::Condition::Quota]);
    assert_eq!(r[1].failures[0].required, 50);
    assert_eq!(r[1].failures[0].actual, 40);
    assert!(r[2].reservation.is_some(), "another buyer is not held up");
    assert_eq!(conditions(&r[3]), vec![pb::Condition::QueueOrder], "b3 may not overtake b2");
}

async fn generations_fence_stale_calls_and_releases_return_quota(store: Store) {
    // Order ids of another form (a reservation key each) and as the orders service numbers them
    // (fields of the product's reservation hashes): the same rules.
    // Each with a buyer of its own, so that each round's licence is the only one its orders use.
    for (buyer, o1, ghost) in [("bytedance", "o1", "ghost"), ("alibaba", "ord-H200-1", "ord-H200-130")] {
        generations_fence_stale_calls_for(store.clone(), buyer, o1, ghost).await;
    }
}

async fn generations_fence_stale_calls_for(store: Store, buyer: &str, o1: &str, ghost: &str) {
    let svc = service(store).await;
    let lic = licensed(&svc, buyer, 100, pb::LicenseConditions::default()).await;
    assert!(batch(&svc, vec![item(o1, 1, buyer, 40)]).await[0].reservation.is_some());
    let release = |order: &str, generation: u64, unless_confirmed: bool| {
        let svc = svc.clone();
        let order = order.to_string();
        async move {
            svc.batch_release_quota(Request::new(pb::BatchReleaseQuotaRequest {
                request_id: rid(),
                items: vec![pb::ReleaseItem { order_id: order, generation, product_sku: "H200".into() }],
                reason: "cancelled".into(),
                unless_confirmed,
            }))
            .await
            .unwrap()
            .into_inner()
            .reservations
            .remove(0)
        }
    };
    let r = release(o1, 1, false).await;
    assert_eq!(r.state(), pb::ReservationState::Released);
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 0);
    let again = release(o1, 1, false).await;
    assert_eq!(again.state(), pb::ReservationState::Released, "releasing twice is harmless");
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 0);

    // A late reserve of the released generation is refused; the next generation works.
    let stale = batch(&svc, vec![item(o1, 1, buyer, 40)]).await.remove(0);
    assert!(stale.stale && stale.reservation.unwrap().state() == pb::ReservationState::Released);
    assert!(batch(&svc, vec![item(o1, 2, buyer, 40)]).await[0].reservation.is_some());

    // Releasing an order that never reserved leaves a tombstone that fences off its late reserve.
    let t = release(ghost, 1, false).await;
    assert_eq!((t.state(), t.units), (pb::ReservationState::Released, 0));
    assert!(batch(&svc, vec![item(ghost, 1, buyer, 10)]).await[0].stale);

    // A higher generation supersedes one still holding quota.
    assert!(batch(&svc, vec![item(o1, 3, buyer, 30)]).await[0].reservation.is_some());
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 30);

    // Confirmed quota survives an unwind that leaves confirmed orders alone, but not a cancel.
    confirm(&svc, o1, 3).await;
    let l = license(&svc, &lic.license_id).await;
    assert_eq!((l.used_units, l.confirmed_units), (30, 30));
    assert_eq!(release(o1, 3, true).await.state(), pb::ReservationState::Confirmed);
    assert_eq!(release(o1, 3, false).await.state(), pb::ReservationState::Released);
    let l = license(&svc, &lic.license_id).await;
    assert_eq!((l.used_units, l.confirmed_units), (0, 0));
}

/// Reservations an earlier version kept as a key each (`keys::reservation`) are still read, and
/// their next write moves them into their field of the product's reservation hashes, in the same
/// commit: the key is gone and the quota counted once.
async fn reservations_kept_as_keys_move_into_the_hashes_on_their_next_write(store: Store) {
    let svc = service(store.clone()).await;
    let lic = licensed(&svc, "bytedance", 100, pb::LicenseConditions::default()).await;
    let sku = Sku::from_trusted("H200");
    let orders = ["ord-H200-300", "ord-H200-301", "ord-H200-302"];
    for o in orders {
        assert!(batch(&svc, vec![item(o, 1, "bytedance", 20)]).await[0].reservation.is_some());
    }
    let place = |o: &str| keys::reservation_field(&sku, &OrderId::from_trusted(o)).unwrap();
    let own_key = |o: &str| keys::reservation(&sku, &OrderId::from_trusted(o));
    let in_field = |o: &str| {
        let store = store.clone();
        let asked = vec![place(o)];
        async move { store.hget_each(&asked).await.unwrap().remove(0).and_then(Record::from_stored) }
    };
    let in_key = |o: &str| {
        let store = store.clone();
        let key = own_key(o);
        async move { store.get(&[key]).await.unwrap().remove(0) }
    };
    assert_eq!(place("ord-H200-300").0, place("ord-H200-301").0, "consecutive orders share a hash");
    // Put each back where the earlier version kept it: the same bytes, as a key of its own.
    for o in orders {
        let stored = in_field(o).await.expect("a new reservation is a field");
        assert_eq!(in_key(o).await, None);
        let (hash, field) = place(o);
        let mut t = chipgate_state::Txn::new();
        t.hdel(hash, field).put(own_key(o), stored.data);
        store.commit(&t).await.unwrap();
    }
    let held = reservation(&svc, "ord-H200-300").await;
    assert_eq!(
        (held.state(), held.units, held.license_id.as_str()),
        (pb::ReservationState::Held, 20, lic.license_id.as_str())
    );

    // Asked again at its generation: answered from the key, nothing taken twice, nothing moved.
    let again = batch(&svc, vec![item("ord-H200-300", 1, "bytedance", 20)]).await.remove(0);
    assert_eq!(again.reservation.map(|r| r.units), Some(20));
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 60);
    assert!(in_key("ord-H200-300").await.is_some());

    // Confirmed, released and superseded: each moves into its field, its key removed.
    confirm(&svc, "ord-H200-300", 1).await;
    batch_release(&svc, "H200", "ord-H200-301", 1).await;
    assert!(batch(&svc, vec![item("ord-H200-302", 2, "bytedance", 5)]).await[0].reservation.is_some());
    for (o, state, units) in [
        ("ord-H200-300", pb::ReservationState::Confirmed, 20),
        ("ord-H200-301", pb::ReservationState::Released, 20),
        ("ord-H200-302", pb::ReservationState::Held, 5),
    ] {
        assert_eq!(in_key(o).await, None, "{o}: its key is gone");
        assert!(in_field(o).await.is_some(), "{o}: in its field");
        let r = reservation(&svc, o).await;
        assert_eq!((r.state(), r.units), (state, units), "{o}");
    }
    let l = license(&svc, &lic.license_id).await;
    assert_eq!((l.used_units, l.confirmed_units), (25, 20), "every unit counted once");
}

async fn domestic_ratio_export_and_embargo_gate_eligibility(store: Store) {
    let svc = service(store).await;
    // No export authorisation yet: submit and publish without it.
    let app = submit(&svc, "bytedance", "H200", 1000).await;
    publish(
        &svc,
        &[(&app.application_id, 1000, pb::LicenseConditions { domestic_ratio_bps: 2500, ..Default::default() })],
    )
    .await;
    let check = |units: u64| {
        let svc = svc.clone();
        async move {
            svc.check_eligibility(Request::new(pb::CheckEligibilityRequest {
                buyer_id: "bytedance".into(),
                product_sku: "H200".into(),
                units,
                justification: String::new(),
            }))
            .await
            .unwrap()
            .into_inner()
        }
    };
    let e = check(400).await;
    let conds: Vec<pb::Condition> = e.failures.iter().map(|f| f.condition()).collect();
    assert_eq!(conds, vec![pb::Condition::ExportAuthorization, pb::Condition::DomesticRatio]);
    let ratio = &e.failures[1];
    assert_eq!((ratio.required, ratio.actual), (100, 0));

    authorize_export(&svc, "H200").await;
    let record = |units: u64, evidence: &str| {
        let svc = svc.clone();
        let evidence = evidence.to_string();
        async move {
            svc.record_domestic_purchase(Request::new(pb::RecordDomesticPurchaseRequest {
                request_id: rid(),
                buyer_id: "bytedance".into(),
                units,
                supplier: "huawei".into(),
                evidence_ref: evidence,
            }))
            .await
        }
    };
    assert_eq!(record(60, "INV-1").await.unwrap().into_inner().total_domestic_units, 60);
    assert_eq!(record(60, "INV-1").await.unwrap().into_inner().total_domestic_units, 60, "same evidence counts once");
    assert_eq!(record(61, "INV-1").await.unwrap_err().code(), Code::AlreadyExists);
    assert!(!check(400).await.eligible);
    assert_eq!(record(40, "INV-2").await.unwrap().into_inner().total_domestic_units, 100);
    let e = check(400).await;
    assert!(e.eligible, "{:?}", e.failures);

    // Customs embargo blocks it; lifting it unblocks.
    let set = |stance: pb::ImportStance| {
        let svc = svc.clone();
        async move {
            svc.set_import_policy(Request::new(pb::SetImportPolicyRequest {
                request_id: rid(),
                product_sku: "H200".into(),
                stance: stance as i32,
                reason: "customs notice".into(),
            }))
            .await
            .unwrap()
        }
    };
    set(pb::ImportStance::Embargoed).await;
    let e = check(400).await;
    assert_eq!(e.failures.iter().map(|f| f.condition()).collect::<Vec<_>>(), vec![pb::Condition::ImportPolicy]);
    let r = batch(&svc, vec![item("o1", 1, "bytedance", 400)]).await;
    assert_eq!(conditions(&r[0]), vec![pb::Condition::ImportPolicy]);
    set(pb::ImportStance::Open).await;
    assert!(batch(&svc, vec![item("o1", 1, "bytedance", 400)]).await[0].reservation.is_some());

    // Revoking the export authorisation blocks new quota too.
    svc.revoke_export_authorization(Request::new(pb::RevokeExportAuthorizationRequest {
        request_id: rid(),
        product_sku: "H200".into(),
        destination: "CN".into(),
        reason: "rule change".into(),
    }))
    .await
    .unwrap();
    let r = batch(&svc, vec![item("o2", 1, "bytedance", 1)]).await;
    assert!(conditions(&r[0]).contains(&pb::Condition::ExportAuthorization));
    let list = svc
        .list_export_authorizations(Request::new(pb::ListExportAuthorizationsRequest {
            page_size: 0,
            page_token: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.authorizations.len(), 1);
    assert!(!list.authorizations[0].active);
}

async fn every_change_is_one_event_and_the_audit_chain_verifies(store: Store) {
    let svc = service(store.clone()).await;
    let before = event_count(&store).await;
    licensed(&svc, "bytedance", 10, pb::LicenseConditions::default()).await;
    // export + submit + create + add + publish (decided in the desk, in force in H200's partition)
    // = 6 events, each in its partition's stream.
    assert_eq!(event_count(&store).await - before, 6);
    batch(&svc, vec![item("o1", 1, "bytedance", 5)]).await;
    assert_eq!(event_count(&store).await - before, 7);
    let v = svc.verify_audit_log(Request::new(pb::VerifyAuditLogRequest::default())).await.unwrap().into_inner();
    assert!(v.valid, "{}", v.problem);
    assert_eq!(v.entries_checked, 7);
    assert_eq!(v.chains.len(), 2, "the desk's chain and H200's: {:?}", v.chains);
    let list = |subject: &str, product: &str, page_size: i32, page_token: String| {
        let svc = svc.clone();
        let (subject, product) = (subject.to_string(), product.to_string());
        async move {
            svc.list_audit_entries(Request::new(pb::ListAuditEntriesRequest {
                subject,
                page_size,
                page_token,
                product_sku: product,
            }))
            .await
            .unwrap()
            .into_inner()
        }
    };
    // The desk's chain: the application and the wave.
    let desk = list("", "", 10, String::new()).await;
    let actions: Vec<&str> = desk.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["application.submitted", "wave.drafted", "wave.grant_added", "wave.published"]);
    // H200's chain, paged: its gate, its licence coming into force, its quota decision.
    let entries = list("", "H200", 2, String::new()).await;
    assert_eq!(entries.entries.len(), 2);
    assert_eq!(entries.entries[0].sequence, 1);
    assert_eq!(entries.entries[1].prev_hash, entries.entries[0].hash);
    assert_eq!(entries.entries[0].action, "export.authorized");
    assert_eq!(entries.entries[1].action, "wave.in_force");
    let rest = list("", "H200", 10, entries.next_page_token).await;
    assert_eq!(rest.entries.len(), 1);
    assert_eq!(rest.entries[0].action, "quota.decided");
    assert!(rest.entries[0].detail.contains("o1/1"));
    let by_subject = list("H200", "H200", 10, String::new()).await;
    assert_eq!(by_subject.entries.len(), 2, "export.authorized and quota.decided are about H200");
}

async fn stale_fencing_tokens_are_refused(store: Store) {
    let svc = service(store).await;
    licensed(&svc, "bytedance", 100, pb::LicenseConditions::default()).await;
    let call = |token: u64, order: &str| {
        let svc = svc.clone();
        let order = order.to_string();
        async move {
            svc.batch_reserve_quota(Request::new(pb::BatchReserveQuotaRequest {
                request_id: String::new(),
                product_sku: "H200".into(),
                items: vec![item(&order, 1, "bytedance", 1)],
                fence_token: token,
            }))
            .await
        }
    };
    call(5, "a").await.unwrap();
    call(7, "b").await.unwrap();
    let stale = call(6, "c").await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(stale.get_error_details().error_info().unwrap().reason, "FENCED");
    call(7, "d").await.unwrap();
}

async fn bad_input_is_refused_with_field_violations(store: Store) {
    let svc = service(store.clone()).await;
    let err = svc
        .submit_application(Request::new(pb::SubmitApplicationRequest {
            request_id: String::new(),
            buyer_id: "has space".into(),
            product_sku: "x".repeat(200),
            quantity: 0,
            end_use: String::new(),
            site: "s".into(),
            destination: "china".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        err.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["request_id", "buyer_id", "product_sku", "quantity", "end_use", "destination"]);
    let batch_err = svc
        .batch_reserve_quota(Request::new(pb::BatchReserveQuotaRequest {
            request_id: String::new(),
            product_sku: "H200".into(),
            items: vec![item("o", 1, "b", 1), item("o", 0, "b", 0)],
            fence_token: 0,
        }))
        .await
        .unwrap_err();
    let fields: Vec<String> =
        batch_err.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["items[1].generation", "items[1].units", "items[1].order_id"]);
    let nf = svc.get_license(Request::new(pb::GetLicenseRequest { license_id: "lic-404".into() })).await.unwrap_err();
    assert_eq!(nf.code(), Code::NotFound);
    assert_eq!(nf.get_error_details().resource_info().unwrap().resource_name, "lic-404");
    assert_eq!(event_count(&store).await, 0, "nothing changed");
}

/// A higher generation that supersedes quota still held, and is then refused, gives the old quota
/// back exactly once: the old generation is recorded as released in the same step, so the release
/// the orders service owes for it changes nothing more (it used to subtract the units again).
async fn a_refused_supersede_gives_the_old_quota_back_once(store: Store) {
    let svc = service(store).await;
    let lic = licensed(&svc, "bytedance", 100, pb::LicenseConditions::default()).await;
    assert!(
        batch(&svc, vec![item("o1", 1, "bytedance", 60), item("o2", 1, "bytedance", 40)]).await[0]
            .reservation
            .is_some()
    );
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 100);
    svc.suspend_license(Request::new(pb::SuspendLicenseRequest {
        request_id: rid(),
        license_id: lic.license_id.clone(),
        reason: "inspection".into(),
    }))
    .await
    .unwrap();
    // o1 moves on to generation 2 (it was unwound) and asks again under the suspended licence.
    let r = batch(&svc, vec![item("o1", 2, "bytedance", 60)]).await.remove(0);
    assert_eq!(conditions(&r), vec![pb::Condition::LicenseInForce]);
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 40, "generation 1's 60 units went back");
    let held = reservation(&svc, "o1").await;
    assert_eq!((held.generation, held.state()), (1, pb::ReservationState::Released));
    // The release owed for generation 1 finds nothing left to give back.
    svc.batch_release_quota(Request::new(pb::BatchReleaseQuotaRequest {
        request_id: rid(),
        items: vec![pb::ReleaseItem { order_id: "o1".into(), generation: 1, product_sku: "H200".into() }],
        reason: "unwound".into(),
        unless_confirmed: true,
    }))
    .await
    .unwrap();
    let l = license(&svc, &lic.license_id).await;
    assert_eq!(l.used_units, 40, "o2's 40 units are still held, and counted once");
    svc.reinstate_license(Request::new(pb::ReinstateLicenseRequest {
        request_id: rid(),
        license_id: lic.license_id.clone(),
        reason: "cleared".into(),
    }))
    .await
    .unwrap();
    // Only the 60 units really free can be taken again: never more than granted.
    let r = batch(&svc, vec![item("o1", 3, "bytedance", 60), item("o3", 1, "bytedance", 1)]).await;
    assert!(r[0].reservation.is_some());
    assert_eq!(conditions(&r[1]), vec![pb::Condition::Quota]);
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 100);
}

/// An order queued behind an earlier waiting one takes nothing, but is rejected when no licence
/// could ever serve it.
async fn items_queued_behind_take_nothing_but_can_be_rejected(store: Store) {
    let svc = service(store).await;
    let lic = licensed(&svc, "bytedance", 100, pb::LicenseConditions { per_order_cap: 50, ..Default::default() }).await;
    let behind =
        |order: &str, units: u64| pb::QuotaItem { queued_behind: "o0".into(), ..item(order, 1, "bytedance", units) };
    let r = batch(&svc, vec![behind("o1", 10), behind("o2", 80)]).await;
    assert_eq!(conditions(&r[0]), vec![pb::Condition::QueueOrder]);
    assert!(r[0].failures[0].description.contains("o0"), "{:?}", r[0].failures);
    assert!(!r[0].rejectable);
    assert!(conditions(&r[1]).contains(&pb::Condition::PerOrderCap));
    assert!(r[1].rejectable, "above the cap: rejected even while queued");
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 0);
}

/// An item asked only to be judged takes nothing: one that would be served says so, one that would
/// not is refused as ever (and, waiting for quota, still holds up the buyer's later items).
async fn items_asked_only_to_be_judged_take_nothing(store: Store) {
    let svc = service(store).await;
    let lic = licensed(&svc, "bytedance", 100, pb::LicenseConditions { per_order_cap: 50, ..Default::default() }).await;
    let judge = |order: &str, units: u64| pb::QuotaItem { judge_only: true, ..item(order, 1, "bytedance", units) };
    let r = batch(&svc, vec![judge("o1", 40), judge("o2", 60), judge("o3", 40)]).await;
    assert!(r[0].servable && r[0].reservation.is_none() && r[0].failures.is_empty(), "{:?}", r[0]);
    assert!(conditions(&r[1]).contains(&pb::Condition::PerOrderCap) && r[1].rejectable && !r[1].servable);
    assert!(r[2].servable, "nothing was taken by o1: {:?}", r[2]);
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 0);
    // Taken for real, then judged: what is left is what it is judged against.
    assert!(
        batch(&svc, vec![item("o1", 1, "bytedance", 50), item("o2", 1, "bytedance", 30)]).await[1]
            .reservation
            .is_some()
    );
    let r = batch(&svc, vec![judge("o3", 30), judge("o4", 10), judge("o5", 20)]).await;
    assert_eq!(conditions(&r[0]), vec![pb::Condition::Quota]);
    assert!(!r[0].servable && !r[0].rejectable);
    assert_eq!(conditions(&r[1]), vec![pb::Condition::QueueOrder], "behind o3, which waits for quota");
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 80);
    // The same order asked for real afterwards takes its quota.
    assert!(batch(&svc, vec![item("o5", 1, "bytedance", 20)]).await[0].reservation.is_some());
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 100);
    // An order moved on to its next generation, judged only: the older generation's quota goes back
    // once, as for a refusal, and is recorded as released.
    let r = batch(&svc, vec![pb::QuotaItem { generation: 2, ..judge("o1", 50) }]).await;
    assert!(r[0].servable, "{:?}", r[0]);
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 50, "generation 1's 50 units went back");
    let held = reservation(&svc, "o1").await;
    assert_eq!((held.generation, held.state()), (1, pb::ReservationState::Released));
}

/// Quota an order's generation already holds (a decision that took it and never landed: its round
/// died before its commit, or its batch was redone) is given back, not answered "held", when the
/// order is asked again behind an earlier order of its buyer or only to be judged: it would
/// otherwise go ahead of the order it queues behind. Asked plainly, it is answered held as ever.
/// The reservation given back is forgotten, so the same generation is judged afresh when next
/// asked (not answered stale), and its units go back once.
async fn held_quota_asked_again_behind_an_earlier_order_goes_back(store: Store) {
    let svc = service(store).await;
    let lic = licensed(&svc, "bytedance", 100, pb::LicenseConditions::default()).await;
    let used = |svc: Licensing| {
        let id = lic.license_id.clone();
        async move { license(&svc, &id).await.used_units }
    };
    // o2 took 30 in a call whose answer never landed; asked plainly again, it is still held.
    assert!(batch(&svc, vec![item("o2", 1, "bytedance", 30)]).await[0].reservation.is_some());
    assert!(batch(&svc, vec![item("o2", 1, "bytedance", 30)]).await[0].reservation.is_some());
    assert_eq!(used(svc.clone()).await, 30);
    // Now o1, earlier, waits for quota, and o2 is asked behind it: refused, and its 30 go back.
    let behind = pb::QuotaItem { queued_behind: "o1".into(), ..item("o2", 1, "bytedance", 30) };
    let r = batch(&svc, vec![behind.clone()]).await;
    assert!(r[0].reservation.is_none() && !r[0].stale, "{:?}", r[0]);
    assert_eq!(conditions(&r[0]), vec![pb::Condition::QueueOrder]);
    assert_eq!(used(svc.clone()).await, 0, "the units went back");
    // Asked again behind it: judged again (not stale), and given back once, not twice.
    let r = batch(&svc, vec![behind]).await;
    assert!(!r[0].stale && r[0].reservation.is_none(), "{:?}", r[0]);
    assert_eq!(conditions(&r[0]), vec![pb::Condition::QueueOrder]);
    assert_eq!(used(svc.clone()).await, 0);
    // Once o1 no longer blocks it, the same generation is judged afresh and takes its quota.
    assert!(batch(&svc, vec![item("o2", 1, "bytedance", 30)]).await[0].reservation.is_some());
    assert_eq!(used(svc.clone()).await, 30);
    assert_eq!(reservation(&svc, "o2").await.state(), pb::ReservationState::Held);
    // Held, then asked only to be judged: given back too, and answered as judged.
    assert!(batch(&svc, vec![item("o3", 1, "bytedance", 20)]).await[0].reservation.is_some());
    let r = batch(&svc, vec![pb::QuotaItem { judge_only: true, ..item("o3", 1, "bytedance", 20) }]).await;
    assert!(r[0].servable && r[0].reservation.is_none(), "{:?}", r[0]);
    assert_eq!(used(svc.clone()).await, 30, "o3's 20 went back; o2's 30 stay");
    // A release of the generation given back finds nothing to give back (o2's 30 stay counted).
    batch_release(&svc, "H200", "o3", 1).await;
    assert_eq!(used(svc.clone()).await, 30);
    // Confirmed quota came from a decision that landed: asked behind an earlier order, still held.
    confirm(&svc, "o2", 1).await;
    let r = batch(&svc, vec![pb::QuotaItem { queued_behind: "o1".into(), ..item("o2", 1, "bytedance", 30) }]).await;
    assert_eq!(r[0].reservation.as_ref().map(|x| x.state()), Some(pb::ReservationState::Confirmed), "{:?}", r[0]);
    assert_eq!(used(svc.clone()).await, 30);
}

/// A draft keeps each grant apart: AddWaveGrant and RemoveWaveGrant answer with the grant and the
/// wave's figures (not every grant so far, so drafting n grants costs n, not n², in answers and
/// their idempotency records), GetWave and ListWaves list the grants in the order they were added
/// (a replaced grant keeps its place), and publishing holds them in the published wave. A draft
/// written when drafts held their grants in their record reads and changes as before.
async fn a_drafts_grants_are_kept_apart_and_answered_one_at_a_time(store: Store) {
    let svc = service(store.clone()).await;
    let apps = [
        submit(&svc, "bytedance", "H200", 100).await,
        submit(&svc, "alibaba", "H200", 200).await,
        submit(&svc, "zhipu", "H200", 300).await,
    ];
    let id = |i: usize| apps[i].application_id.clone();
    let wave = svc
        .create_wave(Request::new(pb::CreateWaveRequest { request_id: rid(), display_name: "w".into() }))
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    let w_id = wave.wave_id.as_str();
    let mut sizes = Vec::new();
    for (i, units) in [10, 20, 30].into_iter().enumerate() {
        let r = grant(&svc, w_id, &id(i), units, rid()).await;
        let (w, g) = (r.wave.clone().unwrap(), r.grant.clone().unwrap());
        assert_eq!((g.application_id, g.granted_units), (id(i), units));
        assert!(w.grants.is_empty(), "the answer carries no other grant");
        sizes.push(r.encoded_len());
    }
    assert!(sizes[2] <= sizes[0] + 2, "an answer doesn't grow with the wave: {sizes:?}");
    // Replaced: the count stays, the units change, the grant keeps its place.
    let again = rid();
    let r = grant(&svc, w_id, &id(0), 5, again.clone()).await;
    let w = r.wave.clone().unwrap();
    assert_eq!((w.grant_count, w.total_granted_units), (3, 55));
    assert_eq!(grant(&svc, w_id, &id(0), 5, again).await, r, "a retry answers the same");
    let listed =
        |w: &pb::Wave| w.grants.iter().map(|g| (g.application_id.clone(), g.granted_units)).collect::<Vec<_>>();
    let w = wave_of(&svc, w_id).await;
    assert_eq!(listed(&w), vec![(id(0), 5), (id(1), 20), (id(2), 30)]);
    assert_eq!((w.grant_count, w.total_granted_units), (3, 55));
    let r = ungrant(&svc, w_id, &id(1)).await.unwrap();
    assert_eq!(r.grant.unwrap().granted_units, 20);
    assert_eq!((r.wave.as_ref().unwrap().grant_count, r.wave.unwrap().total_granted_units), (2, 35));
    assert_eq!(ungrant(&svc, w_id, &id(1)).await.unwrap_err().code(), Code::NotFound);
    // Added again: at the end, a new place.
    grant(&svc, w_id, &id(1), 21, rid()).await;
    assert_eq!(listed(&wave_of(&svc, w_id).await), vec![(id(0), 5), (id(2), 30), (id(1), 21)]);
    let all = svc.list_waves(Request::new(pb::ListWavesRequest::default())).await.unwrap().into_inner().waves;
    assert_eq!(listed(all.iter().find(|x| x.wave_id == w_id).unwrap()), listed(&wave_of(&svc, w_id).await));
    // Published: the licences follow the order the grants were added in, and the wave lists them.
    let published = svc
        .publish_wave(Request::new(pb::PublishWaveRequest { request_id: rid(), wave_id: w_id.into() }))
        .await
        .unwrap()
        .into_inner();
    let buyers: Vec<&str> = published.licenses.iter().map(|l| l.buyer_id.as_str()).collect();
    assert_eq!(buyers, ["bytedance", "zhipu", "alibaba"]);
    let w = wave_of(&svc, w_id).await;
    assert_eq!(listed(&w), vec![(id(0), 5), (id(2), 30), (id(1), 21)]);
    assert_eq!((w.state(), w.grant_count, w.total_granted_units), (pb::WaveState::Published, 3, 56));
    assert!(w.grants.iter().all(|g| !g.license_id.is_empty()));
    let apart = chipgate_licensing::keys::wave_grants(&WaveId::from_trusted(w_id));
    assert_eq!(store.zcard(&apart).await.unwrap(), 0, "nothing is left apart once published");

    // A draft as written before grants were kept apart: its record holds them.
    let old = [
        submit(&svc, "tencent", "H200", 100).await,
        submit(&svc, "baidu", "H200", 100).await,
        submit(&svc, "moonshot", "H200", 100).await,
    ];
    let old_id = |i: usize| old[i].application_id.clone();
    let legacy = WaveId::from_trusted("wave-900");
    let held = |a: &pb::Application, units| chipgate_domain::licensing::GrantRecord {
        application_id: a.application_id.clone(),
        buyer_id: a.buyer_id.clone(),
        product_sku: a.product_sku.clone(),
        granted: units,
        ..Default::default()
    };
    let record = chipgate_domain::licensing::WaveRecord {
        id: legacy.to_string(),
        display_name: "old".into(),
        status: chipgate_domain::licensing::WaveStatus::Draft as i32,
        grants: vec![held(&old[0], 1), held(&old[1], 2)],
        seq: 900,
        ..Default::default()
    };
    let mut t = chipgate_state::Txn::new();
    t.put(chipgate_licensing::keys::wave(&legacy), record.encode_to_vec());
    store.commit(&t).await.unwrap();
    let w = wave_of(&svc, "wave-900").await;
    assert_eq!(listed(&w), vec![(old_id(0), 1), (old_id(1), 2)]);
    assert_eq!((w.grant_count, w.total_granted_units), (2, 3));
    // Its first change moves its grants apart, in their order; one replaced keeps its place.
    let r = grant(&svc, "wave-900", &old_id(0), 7, rid()).await;
    assert_eq!((r.wave.as_ref().unwrap().grant_count, r.wave.unwrap().total_granted_units), (2, 9));
    grant(&svc, "wave-900", &old_id(2), 3, rid()).await;
    let w = wave_of(&svc, "wave-900").await;
    assert_eq!(listed(&w), vec![(old_id(0), 7), (old_id(1), 2), (old_id(2), 3)]);
    assert_eq!((w.grant_count, w.total_granted_units), (3, 12));
    assert_eq!(ungrant(&svc, "wave-900", &old_id(1)).await.unwrap().wave.unwrap().grant_count, 2);
    let published = svc
        .publish_wave(Request::new(pb::PublishWaveRequest { request_id: rid(), wave_id: "wave-900".into() }))
        .await
        .unwrap()
        .into_inner();
    let buyers: Vec<&str> = published.licenses.iter().map(|l| l.buyer_id.as_str()).collect();
    assert_eq!(buyers, ["tencent", "moonshot"]);
}

/// ListWaves ends a page early where its waves would hold more than 20,000 grants (a wave may hold
/// 10,000; a page of full waves would pass gRPC's 4 MB message limit), always lists at least one
/// wave, and its pages together list every wave once.
async fn wave_listings_stay_under_the_message_limit(store: Store) {
    let svc = service(store.clone()).await;
    // Drafts as written before grants were kept apart (no applications are needed to list them):
    // 12,000 grants each, more than a wave may take through the API, so two never share a page.
    let mut t = chipgate_state::Txn::new();
    for n in 1..=3u64 {
        let id = WaveId::from_trusted(format!("wave-{n}"));
        let grants = (0..12_000)
            .map(|i| chipgate_domain::licensing::GrantRecord {
                application_id: format!("app-{i}"),
                buyer_id: "bytedance".into(),
                product_sku: "H200".into(),
                granted: 1,
                ..Default::default()
            })
            .collect();
        let w = chipgate_domain::licensing::WaveRecord {
            id: id.to_string(),
            status: chipgate_domain::licensing::WaveStatus::Draft as i32,
            grants,
            seq: n,
            ..Default::default()
        };
        t.put(chipgate_licensing::keys::wave(&id), w.encode_to_vec());
        t.zadd(chipgate_licensing::keys::waves(), id.as_str(), n as f64);
    }
    store.commit(&t).await.unwrap();
    let mut token = String::new();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = svc
            .list_waves(Request::new(pb::ListWavesRequest { page_size: 10, page_token: token }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.waves.len(), 1, "one 12,000-grant wave per page");
        assert!(r.encoded_len() < 4 << 20, "{} bytes", r.encoded_len());
        assert_eq!(r.waves[0].grants.len(), 12_000);
        seen.push(r.waves[0].wave_id.clone());
        token = r.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, ["wave-3", "wave-2", "wave-1"], "newest first, each once");
}

/// RecheckQuota answers, for quota held, whether the licence and the product's gates still allow it,
/// in the words evaluation uses, and changes nothing.
async fn held_quota_is_rechecked_against_the_licence_and_the_gates(store: Store) {
    let svc = service(store).await;
    let lic = licensed(&svc, "bytedance", 100, pb::LicenseConditions::default()).await;
    assert!(batch(&svc, vec![item("o1", 1, "bytedance", 10)]).await[0].reservation.is_some());
    let recheck = |generation: u64| {
        let svc = svc.clone();
        async move {
            svc.recheck_quota(Request::new(pb::RecheckQuotaRequest {
                product_sku: "H200".into(),
                items: vec![
                    pb::ReleaseItem { order_id: "o1".into(), generation, product_sku: String::new() },
                    pb::ReleaseItem { order_id: "nobody".into(), generation: 1, product_sku: String::new() },
                ],
            }))
            .await
            .unwrap()
            .into_inner()
            .results
        }
    };
    let r = recheck(1).await;
    assert!(r[0].failures.is_empty() && r[0].reservation.is_some());
    assert!(r[1].failures.is_empty() && r[1].reservation.is_none());
    svc.set_import_policy(Request::new(pb::SetImportPolicyRequest {
        request_id: rid(),
        product_sku: "H200".into(),
        stance: pb::ImportStance::Embargoed as i32,
        reason: "notice 7".into(),
    }))
    .await
    .unwrap();
    svc.suspend_license(Request::new(pb::SuspendLicenseRequest {
        request_id: rid(),
        license_id: lic.license_id.clone(),
        reason: "inspection".into(),
    }))
    .await
    .unwrap();
    let r = recheck(1).await;
    assert_eq!(conditions_of(&r[0].failures), vec![pb::Condition::LicenseInForce, pb::Condition::ImportPolicy]);
    assert!(r[0].failures[1].description.contains("notice 7"));
    assert!(recheck(2).await[0].failures.is_empty(), "a generation that holds nothing is not judged");
    assert_eq!(license(&svc, &lic.license_id).await.used_units, 10, "a recheck changes nothing");
    let bad = svc
        .recheck_quota(Request::new(pb::RecheckQuotaRequest { product_sku: "H200".into(), items: vec![] }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

/// Applications name products of the catalogue only.
async fn applications_for_unknown_products_are_refused(store: Store) {
    let svc = service(store).await;
    let e = svc
        .submit_application(Request::new(pb::SubmitApplicationRequest {
            request_id: rid(),
            buyer_id: "bytedance".into(),
            product_sku: "H900-NOPE".into(),
            quantity: 10,
            end_use: "training".into(),
            site: "DC".into(),
            destination: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let bad = e.get_error_details().bad_request().cloned().unwrap();
    assert_eq!(bad.field_violations[0].field, "product_sku");
    assert!(bad.field_violations[0].description.contains("not in the vendor's catalogue"));
    assert!(queue_ids(&svc).await.is_empty(), "nothing joined the queue");
}

/// A draft wave's preview answers exactly what BatchReserveQuota answers once it is published (the
/// same licences, numbered alike; pending terms, the domestic ratio and the per-order cap in play) and
/// changes nothing: no licence, no reservation, no event, no audit entry.
async fn a_draft_wave_previews_what_its_publication_will_do(store: Store) {
    let svc = service(store.clone()).await;
    authorize_export(&svc, "H200").await;
    let a = submit(&svc, "alpha", "H200", 500).await;
    let b = submit(&svc, "beta", "H200", 500).await;
    let c = submit(&svc, "gamma", "H200-NVL", 50).await;
    let wave = svc
        .create_wave(Request::new(pb::CreateWaveRequest { request_id: rid(), display_name: "w".into() }))
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    let grants = [
        (&a.application_id, 300, pb::LicenseConditions { per_order_cap: 200, ..Default::default() }),
        (&b.application_id, 400, pb::LicenseConditions { domestic_ratio_bps: 2500, ..Default::default() }),
        (&c.application_id, 50, pb::LicenseConditions { terms_pending: true, ..Default::default() }),
    ];
    for (app, units, cond) in grants {
        svc.add_wave_grant(Request::new(pb::AddWaveGrantRequest {
            request_id: rid(),
            wave_id: wave.wave_id.clone(),
            application_id: app.clone(),
            granted_units: units,
            conditions: Some(cond),
        }))
        .await
        .unwrap();
    }
    let items = || {
        vec![
            item("o1", 1, "alpha", 150),
            item("o2", 1, "beta", 100),
            item("o3", 1, "alpha", 250),
            item("o4", 1, "alpha", 160),
            item("o5", 1, "alpha", 10),
        ]
    };
    let preview = |items: Vec<pb::QuotaItem>| {
        let svc = svc.clone();
        let wave_id = wave.wave_id.clone();
        async move {
            svc.preview_wave_quota(Request::new(pb::PreviewWaveQuotaRequest {
                wave_id,
                product_sku: "H200".into(),
                items,
            }))
            .await
        }
    };
    let ids = |ls: &[pb::License]| ls.iter().map(|l| (l.license_id.clone(), l.state)).collect::<Vec<_>>();
    let events = event_count(&store).await;
    let p = preview(items()).await.unwrap().into_inner();
    assert_eq!(event_count(&store).await, events, "a preview changes nothing");
    assert_eq!(p.licenses.len(), 3, "every product of the wave");
    assert_eq!(p.licenses[2].state(), pb::LicenseState::PendingTerms);
    // A preview without items only lists the licences; a bad item is refused with its field.
    let bare = svc
        .preview_wave_quota(Request::new(pb::PreviewWaveQuotaRequest {
            wave_id: wave.wave_id.clone(),
            product_sku: String::new(),
            items: vec![],
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&bare.licenses), ids(&p.licenses));
    let bad = preview(vec![item("o1", 0, "alpha", 1)]).await.unwrap_err();
    assert_eq!(bad.get_error_details().bad_request().unwrap().field_violations[0].field, "items[0].generation");

    let published = svc
        .publish_wave(Request::new(pb::PublishWaveRequest { request_id: rid(), wave_id: wave.wave_id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&p.licenses), ids(&published.licenses), "the ids the preview foresaw");
    let real = batch(&svc, items()).await;
    let strip = |r: &[pb::QuotaItemResult]| {
        r.iter()
            .map(|x| {
                (
                    x.order_id.clone(),
                    x.reservation.as_ref().map(|q| (q.license_id.clone(), q.units)),
                    x.failures.clone(),
                    x.rejectable,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&p.results), strip(&real));
    // o1 fits under alpha's cap; beta fails its ratio; o3 is above the per-order cap (rejectable);
    // o4 passes the cap but not the quota left (150 of 300 in use); o5 queues behind it.
    assert!(real[0].reservation.is_some());
    assert_eq!(conditions(&real[1]), vec![pb::Condition::DomesticRatio]);
    assert!(real[2].rejectable);
    assert_eq!(conditions(&real[4]), vec![pb::Condition::QueueOrder]);
    // Once published, there is nothing to preview.
    assert_eq!(preview(items()).await.unwrap_err().code(), Code::FailedPrecondition);
}

/// A wave over two products is decided in the desk and put in force in each product's partition:
/// each product's licences, quota decisions and audit chain stay in its own slot, and the audit log
/// (the desk's chain and one per product) verifies as a whole.
async fn a_wave_over_two_products_is_in_force_in_each_products_partition(store: Store) {
    let svc = service(store.clone()).await;
    authorize_export(&svc, "H200").await;
    authorize_export(&svc, "H200-NVL").await;
    let a = submit(&svc, "bytedance", "H200", 100).await;
    let b = submit(&svc, "bytedance", "H200-NVL", 50).await;
    let c = submit(&svc, "alibaba", "H200-NVL", 70).await;
    let published = publish(
        &svc,
        &[
            (&a.application_id, 100, pb::LicenseConditions::default()),
            (&b.application_id, 50, pb::LicenseConditions::default()),
            (&c.application_id, 70, pb::LicenseConditions::default()),
        ],
    )
    .await;
    let ids: Vec<&str> = published.licenses.iter().map(|l| l.license_id.as_str()).collect();
    assert!(ids[0].starts_with("lic-H200-") && ids[1].starts_with("lic-H200-NVL-"), "{ids:?}");
    assert!(published.wave.as_ref().unwrap().pending_products.is_empty());
    for l in &published.licenses {
        let key = chipgate_licensing::keys::license(&LicenceId::from_trusted(l.license_id.as_str())).unwrap();
        let sku = Sku::from_trusted(l.product_sku.as_str());
        assert_eq!(chipgate_state::key_slot(&key), chipgate_licensing::keys::part(&sku).slot());
        assert_eq!(license(&svc, &l.license_id).await.granted_units, l.granted_units);
    }
    // One WavePublished per product, each naming that product's licences only.
    let mut per_product: Vec<(String, usize)> = all_events(&store)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(pb::licensing_event::Kind::WavePublished(p)) => {
                let skus: std::collections::BTreeSet<String> =
                    p.licenses.iter().map(|l| l.product_sku.clone()).collect();
                assert_eq!(skus.len(), 1, "one product per event: {skus:?}");
                Some((skus.into_iter().next().unwrap(), p.licenses.len()))
            }
            _ => None,
        })
        .collect();
    per_product.sort();
    assert_eq!(per_product, vec![("H200".to_string(), 1), ("H200-NVL".to_string(), 2)]);
    // Quota of each product is decided in its partition against its licences.
    let nvl = batch_of(&svc, "H200-NVL", vec![item("n1", 1, "alibaba", 70), item("n2", 1, "alibaba", 1)]).await;
    assert_eq!(nvl[0].reservation.as_ref().unwrap().license_id, ids[2]);
    assert_eq!(conditions(&nvl[1]), vec![pb::Condition::Quota], "alibaba's 70 units are used up");
    assert!(batch(&svc, vec![item("h1", 1, "bytedance", 100)]).await[0].reservation.is_some());
    let v = svc.verify_audit_log(Request::new(pb::VerifyAuditLogRequest::default())).await.unwrap().into_inner();
    assert!(v.valid, "{}", v.problem);
    let chains: Vec<&str> = v.chains.iter().map(|c| c.chain.as_str()).collect();
    assert_eq!(chains, ["{lic:H200-NVL}:audit", "{lic:H200}:audit", "{lic}:audit"]);
    let cp = svc
        .get_audit_checkpoint(Request::new(pb::GetAuditCheckpointRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(cp.chains.len(), 3, "a checkpoint binds every partition's head");
}

/// The state a crash between publishing's two steps leaves: the wave decided in the desk, product
/// `sku`'s licences not written. Built from a finished publication by taking the product's part back
/// out (its licences and its licence index) and marking it pending again, as step 1 leaves it.
async fn undo_in_force(store: &Store, wave_id: &str, sku: &str, licence_ids: &[&str], buyers: &[&str]) {
    let mut t = chipgate_state::Txn::new();
    for id in licence_ids {
        t.delete(chipgate_licensing::keys::license(&LicenceId::from_trusted(*id)).unwrap());
    }
    for b in buyers {
        t.delete(chipgate_licensing::keys::license_index(&BuyerId::from_trusted(*b), &Sku::from_trusted(sku)));
    }
    store.commit(&t).await.unwrap();
    let key = chipgate_licensing::keys::wave(&WaveId::from_trusted(wave_id));
    let rec = store.get(std::slice::from_ref(&key)).await.unwrap().pop().flatten().unwrap();
    let mut wave = chipgate_domain::licensing::WaveRecord::decode(rec.data.as_slice()).unwrap();
    wave.pending_products = vec![sku.to_string()];
    let mut t = chipgate_state::Txn::new();
    t.replace(key, rec.version, wave.encode_to_vec());
    t.sadd(chipgate_licensing::keys::waves_pending(), wave_id);
    store.commit(&t).await.unwrap();
}

/// A crash between deciding a wave and putting its licences in force loses nothing: a retried
/// PublishWave (same request id) finishes the wave, and so does the recovery task on its own; putting
/// a product in force twice writes nothing twice.
async fn a_wave_decided_but_not_in_force_is_finished_by_a_retry_or_by_recovery(store: Store) {
    let svc = service(store.clone()).await;
    authorize_export(&svc, "H200-NVL").await;
    let app = submit(&svc, "bytedance", "H200-NVL", 40).await;
    let wave = svc
        .create_wave(Request::new(pb::CreateWaveRequest { request_id: rid(), display_name: "w".into() }))
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    svc.add_wave_grant(Request::new(pb::AddWaveGrantRequest {
        request_id: rid(),
        wave_id: wave.wave_id.clone(),
        application_id: app.application_id.clone(),
        granted_units: 40,
        conditions: None,
    }))
    .await
    .unwrap();
    let publish_id = rid();
    let publish = || {
        svc.publish_wave(Request::new(pb::PublishWaveRequest {
            request_id: publish_id.clone(),
            wave_id: wave.wave_id.clone(),
        }))
    };
    let first = publish().await.unwrap().into_inner();
    let lic = first.licenses[0].license_id.clone();
    let stream = chipgate_contract::streams::licensing_product(&Sku::from_trusted("H200-NVL"));
    let events = store.xlen(&stream).await.unwrap();

    // A retry when nothing is pending changes nothing.
    let again = publish().await.unwrap().into_inner();
    assert_eq!(again.licenses[0].license_id, lic);
    assert_eq!(store.xlen(&stream).await.unwrap(), events, "put in force once");

    // Crashed before step 2: the licence is missing, the wave says so; the retry finishes it.
    undo_in_force(&store, &wave.wave_id, "H200-NVL", &[&lic], &["bytedance"]).await;
    let got = svc.get_license(Request::new(pb::GetLicenseRequest { license_id: lic.clone() })).await.unwrap_err();
    assert_eq!(got.code(), Code::NotFound);
    let w = svc
        .get_wave(Request::new(pb::GetWaveRequest { wave_id: wave.wave_id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    assert_eq!(w.pending_products, ["H200-NVL"]);
    let retried = publish().await.unwrap().into_inner();
    assert!(retried.wave.unwrap().pending_products.is_empty());
    assert_eq!(license(&svc, &lic).await.granted_units, 40);
    assert_eq!(store.xlen(&stream).await.unwrap(), events + 1, "its WavePublished is told again");
    let held = batch_of(&svc, "H200-NVL", vec![item("o1", 1, "bytedance", 40)]).await;
    assert_eq!(held[0].reservation.as_ref().unwrap().license_id, lic, "the licence index is back too");

    // The same crash finished by the recovery task, without any call.
    batch_release(&svc, "H200-NVL", "o1", 1).await;
    undo_in_force(&store, &wave.wave_id, "H200-NVL", &[&lic], &["bytedance"]).await;
    let shutdown = chipgate_runtime::Shutdown::new();
    let task = svc.spawn_wave_recovery(shutdown.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let in_force = svc.get_license(Request::new(pb::GetLicenseRequest { license_id: lic.clone() })).await.is_ok();
        let pending = svc
            .get_wave(Request::new(pb::GetWaveRequest { wave_id: wave.wave_id.clone() }))
            .await
            .unwrap()
            .into_inner()
            .wave
            .unwrap()
            .pending_products;
        let listed = store.smembers(&chipgate_licensing::keys::waves_pending()).await.unwrap();
        if in_force && pending.is_empty() && listed.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "recovery never finished the wave: {pending:?} {listed:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    shutdown.trigger();
    task.await.unwrap();
    assert_eq!(license(&svc, &lic).await.granted_units, 40);
    let v = svc.verify_audit_log(Request::new(pb::VerifyAuditLogRequest::default())).await.unwrap().into_inner();
    assert!(v.valid, "{}", v.problem);
}

async fn batch_of(svc: &Licensing, sku: &str, items: Vec<pb::QuotaItem>) -> Vec<pb::QuotaItemResult> {
    svc.batch_reserve_quota(Request::new(pb::BatchReserveQuotaRequest {
        request_id: String::new(),
        product_sku: sku.into(),
        items,
        fence_token: 0,
    }))
    .await
    .unwrap()
    .into_inner()
    .results
}

async fn batch_release(svc: &Licensing, sku: &str, order: &str, generation: u64) {
    svc.batch_release_quota(Request::new(pb::BatchReleaseQuotaRequest {
        request_id: rid(),
        items: vec![pb::ReleaseItem { order_id: order.into(), generation, product_sku: sku.into() }],
        reason: "test".into(),
        unless_confirmed: false,
    }))
    .await
    .unwrap();
}

/// An audit entry names both ids of the call that made it: the correlation id (`x-request-id`, or
/// one the service made up) and the call's own request id, its idempotency key, which stays the same
/// over retries; a retry adds no entry.
async fn audit_entries_name_the_calls_idempotency_key(store: Store) {
    let svc = service(store).await;
    let call = |correlation: &str| {
        let mut req = Request::new(pb::SubmitApplicationRequest {
            request_id: "idem-42".into(),
            buyer_id: "bytedance".into(),
            product_sku: "H200".into(),
            quantity: 10,
            end_use: "LLM training".into(),
            site: "Ulanqab DC".into(),
            destination: String::new(),
        });
        req.metadata_mut().insert("x-request-id", correlation.parse().unwrap());
        svc.submit_application(req)
    };
    call("corr-7").await.unwrap();
    call("corr-8").await.unwrap();
    let entries = svc
        .list_audit_entries(Request::new(pb::ListAuditEntriesRequest { page_size: 10, ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1, "the retry replays: {entries:?}");
    assert_eq!((entries[0].request_id.as_str(), entries[0].idempotency_key.as_str()), ("corr-7", "idem-42"));
}

/// A replica reads the licences its buyers' indexes named when it last read them beside the indexes
/// (one round trip): a licence granted since, through another replica, is still used by its next
/// quota call, and one the buyer's index no longer names is not, whatever it read before.
async fn licences_granted_or_gone_since_a_replica_last_read_them_are_seen(store: Store) {
    let desk = service(store.clone()).await;
    let replica = Licensing::new(store.clone());
    let licence_of = |r: &pb::QuotaItemResult| r.reservation.as_ref().map(|x| x.license_id.clone());
    let first = licensed(&desk, "bytedance", 100, Default::default()).await;
    let r = batch(&replica, vec![item("o1", 1, "bytedance", 100)]).await;
    assert_eq!(licence_of(&r[0]), Some(first.license_id.clone()));
    // Used up: the replica has read the buyer's licences (the first alone) twice now.
    let r = batch(&replica, vec![item("o2", 1, "bytedance", 50)]).await;
    assert_eq!(licence_of(&r[0]), None, "{r:?}");
    // A second wave grants another licence, through the other replica.
    let app = submit(&desk, "bytedance", "H200", 50).await;
    let second = publish(&desk, &[(&app.application_id, 50, Default::default())]).await.licenses.remove(0);
    let r = batch(&replica, vec![item("o2", 1, "bytedance", 50)]).await;
    assert_eq!(licence_of(&r[0]), Some(second.license_id.clone()), "{r:?}");
    assert_eq!(license(&replica, &second.license_id).await.used_units, 50);
    // The buyer's index gone (its licences kept): nothing to take from, though the replica read two.
    let mut t = chipgate_state::Txn::new();
    t.delete(chipgate_licensing::keys::license_index(&BuyerId::from_trusted("bytedance"), &Sku::from_trusted("H200")));
    store.commit(&t).await.unwrap();
    let r = batch(&replica, vec![item("o3", 1, "bytedance", 1)]).await;
    assert_eq!(licence_of(&r[0]), None, "{r:?}");
    assert!(conditions(&r[0]).contains(&pb::Condition::License), "{r:?}");
}

/// A counter of `svc`'s metrics (0 before it first counts).
async fn counter(svc: &Licensing, name: &str) -> u64 {
    let text = svc.metrics().render().await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// A replica decides a quota call from the product's world as it last left it, without reading it
/// first (every part of it guarded): whatever another replica or writer changed in between, no call
/// takes quota that isn't there, uses a licence the buyer's index no longer names, or overlooks a
/// reservation its order already holds.
async fn quota_calls_decided_from_what_a_replica_last_saw_stay_exact(store: Store) {
    let desk = service(store.clone()).await;
    let (a, b) = (Licensing::new(store.clone()), Licensing::new(store.clone()));
    let lic = licensed(&desk, "bytedance", 100, Default::default()).await;
    let held = |r: &[pb::QuotaItemResult]| r[0].reservation.as_ref().map(|x| x.units);
    assert_eq!(held(&batch(&a, vec![item("ord-H200-1", 1, "bytedance", 30)]).await), Some(30));
    assert_eq!(held(&batch(&a, vec![item("ord-H200-2", 1, "bytedance", 30)]).await), Some(30));
    assert_eq!(counter(&a, "chipgate_quota_calls_unread").await, 1, "the second call decided without a read");

    // Another replica takes quota: what the first last saw is stale.
    assert_eq!(held(&batch(&b, vec![item("ord-H200-3", 1, "bytedance", 30)]).await), Some(30));
    let r = batch(&a, vec![item("ord-H200-4", 1, "bytedance", 30)]).await;
    assert_eq!(held(&r), None, "10 left, not the 40 it last saw: {r:?}");
    assert_eq!(counter(&a, "chipgate_quota_calls_unread_missed").await, 1);
    assert_eq!(license(&a, &lic.license_id).await.used_units, 90);

    // After a miss a call reads first; the one after it decides without reading again.
    assert_eq!(held(&batch(&a, vec![item("ord-H200-5", 1, "bytedance", 1)]).await), Some(1));
    assert_eq!(held(&batch(&a, vec![item("ord-H200-6", 1, "bytedance", 1)]).await), Some(1));
    assert_eq!(counter(&a, "chipgate_quota_calls_unread").await, 2);

    // A reservation written behind the replica's back (no audit entry, the chain's head unmoved):
    // its order asking again gets it back, not a second one.
    let order = OrderId::from_trusted("ord-H200-7");
    let sku = Sku::from_trusted("H200");
    let (hash, field) = keys::reservation_field(&sku, &order).unwrap();
    let existing = chipgate_domain::licensing::ReservationRecord {
        order_id: order.to_string(),
        generation: 1,
        license_id: lic.license_id.clone(),
        buyer_id: "bytedance".into(),
        product_sku: "H200".into(),
        units: 4,
        status: chipgate_domain::licensing::ReservationStatus::Held as i32,
        ..Default::default()
    };
    let mut t = chipgate_state::Txn::new();
    t.replace_field(hash, field, 0, &existing.to_stored());
    store.commit(&t).await.unwrap();
    let r = batch(&a, vec![item("ord-H200-7", 1, "bytedance", 4)]).await;
    assert_eq!(held(&r), Some(4), "{r:?}");
    assert_eq!(counter(&a, "chipgate_quota_calls_unread_missed").await, 2, "the guess met the reservation");
    assert_eq!(license(&a, &lic.license_id).await.used_units, 92, "not taken a second time");
    // So for an order the guess would refuse (nothing of it written): it is answered with the
    // reservation it holds, not refused.
    batch(&a, vec![item("ord-H200-12", 1, "bytedance", 1)]).await;
    let order = OrderId::from_trusted("ord-H200-11");
    let (hash, field) = keys::reservation_field(&sku, &order).unwrap();
    let existing = chipgate_domain::licensing::ReservationRecord { order_id: order.to_string(), ..existing };
    let mut t = chipgate_state::Txn::new();
    t.replace_field(hash, field, 0, &existing.to_stored());
    store.commit(&t).await.unwrap();
    let r = batch(&a, vec![item("ord-H200-11", 1, "bytedance", 1_000)]).await;
    assert_eq!(held(&r), Some(4), "{r:?}");
    assert_eq!(counter(&a, "chipgate_quota_calls_unread_missed").await, 3, "the guess met the reservation");

    // The buyer's index gone behind the replica's back: nothing to take from.
    batch(&a, vec![item("ord-H200-8", 1, "bytedance", 1)]).await;
    batch(&a, vec![item("ord-H200-9", 1, "bytedance", 1)]).await;
    let mut t = chipgate_state::Txn::new();
    t.delete(keys::license_index(&BuyerId::from_trusted("bytedance"), &sku));
    store.commit(&t).await.unwrap();
    let r = batch(&a, vec![item("ord-H200-10", 1, "bytedance", 1)]).await;
    assert_eq!(held(&r), None, "{r:?}");
    assert!(conditions(&r[0]).contains(&pb::Condition::License), "{r:?}");
    // Every decision is on the chain once, linked to the one before.
    let v = a.verify_audit_log(Request::new(pb::VerifyAuditLogRequest::default())).await.unwrap().into_inner();
    assert!(v.valid, "{}", v.problem);
}

/// A replica that decides its quota calls without reading commits in one round trip, a replica that
/// reads in two; while the first has calls queued for a product, the second's commits could keep
/// failing (the first's land between its read and its commit) until it gives up with CONTENTION.
/// The loser takes its turn instead (`worlds.rs`): every call of the reading replica gets its answer
/// while the other keeps calling as fast as it can, and no unit is taken twice.
async fn a_replica_deciding_without_reading_never_starves_one_that_reads(store: Store) {
    let desk = service(store.clone()).await;
    let (fast, slow) = (Licensing::new(store.clone()), Licensing::new(store.clone()));
    let lic = licensed(&desk, "bytedance", 100_000, Default::default()).await;
    let call = |svc: &Licensing, order: String| {
        let svc = svc.clone();
        async move {
            svc.batch_reserve_quota(Request::new(pb::BatchReserveQuotaRequest {
                request_id: String::new(),
                product_sku: "H200".into(),
                items: vec![item(&order, 1, "bytedance", 1)],
                fence_token: 0,
            }))
            .await
            .map(|r| r.into_inner().results.remove(0).reservation.map(|r| r.units))
        }
    };
    // The fast replica learns the product, then calls back to back (up to a bound) until the slow
    // one is done; its calls after the first go without reading.
    call(&fast, "ord-H200-1".into()).await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fast_calls = tokio::spawn({
        let (fast, done) = (fast.clone(), done.clone());
        async move {
            let mut n = 1u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && n < 5_000 {
                n += 1;
                let got = call(&fast, format!("ord-H200-{n}")).await.unwrap();
                assert_eq!(got, Some(1), "call {n} of the fast replica");
            }
            n
        }
    });
    let mut slow_held = 0;
    for k in 0..40 {
        match call(&slow, format!("slow-{k}")).await {
            Ok(got) => slow_held += got.unwrap_or(0),
            Err(e) => panic!("call {k} of the replica that reads: {e:?}"),
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let fast_held = fast_calls.await.unwrap();
    assert_eq!(slow_held, 40, "every call of the replica that reads took its unit");
    assert_eq!(license(&desk, &lic.license_id).await.used_units, fast_held + slow_held);
    let v = desk.verify_audit_log(Request::new(pb::VerifyAuditLogRequest::default())).await.unwrap().into_inner();
    assert!(v.valid, "{}", v.problem);
}

backend_tests!(
    a_replica_deciding_without_reading_never_starves_one_that_reads,
    quota_calls_decided_from_what_a_replica_last_saw_stay_exact,
    licences_granted_or_gone_since_a_replica_last_read_them_are_seen,
    reservations_kept_as_keys_move_into_the_hashes_on_their_next_write,
    audit_entries_name_the_calls_idempotency_key,
    a_wave_over_two_products_is_in_force_in_each_products_partition,
    a_wave_decided_but_not_in_force_is_finished_by_a_retry_or_by_recovery,
    ids_with_separators_never_collide,
    applications_queue_in_order_with_one_open_each,
    submissions_are_idempotent_per_request_id,
    waves_publish_atomically_and_never_change,
    licence_states_gate_quota,
    quota_is_never_exceeded_under_concurrency,
    batches_serve_in_order_without_overtaking,
    generations_fence_stale_calls_and_releases_return_quota,
    domestic_ratio_export_and_embargo_gate_eligibility,
    every_change_is_one_event_and_the_audit_chain_verifies,
    stale_fencing_tokens_are_refused,
    bad_input_is_refused_with_field_violations,
    a_refused_supersede_gives_the_old_quota_back_once,
    items_queued_behind_take_nothing_but_can_be_rejected,
    items_asked_only_to_be_judged_take_nothing,
    held_quota_asked_again_behind_an_earlier_order_goes_back,
    a_drafts_grants_are_kept_apart_and_answered_one_at_a_time,
    wave_listings_stay_under_the_message_limit,
    held_quota_is_rechecked_against_the_licence_and_the_gates,
    applications_for_unknown_products_are_refused,
    a_draft_wave_previews_what_its_publication_will_do,
);
