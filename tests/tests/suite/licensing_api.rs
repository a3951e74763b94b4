//! Licensing over the wire: every RPC answers through a real gRPC connection, errors keep their rich
//! details across it, and the audit log detects tampering done directly in Redis.

use chipgate_proto::licensing::v1 as pb;
use chipgate_testkit::Cluster;
use tonic::Code;
use tonic_types::StatusExt;

type Client = chipgate_testkit::LicensingClient;

fn rid(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

async fn submit(c: &mut Client, buyer: &str, qty: u64) -> pb::Application {
    c.submit_application(pb::SubmitApplicationRequest {
        request_id: rid("submit"),
        buyer_id: buyer.into(),
        product_sku: "H200-SXM-141GB".into(),
        quantity: qty,
        end_use: "foundation model training".into(),
        site: "Zhangbei".into(),
        destination: "CN".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .application
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_licensing_rpc_answers_over_grpc() {
    let cluster = Cluster::start().await;
    let mut c = cluster.licensing_client();

    // Export side and customs.
    c.grant_export_authorization(pb::GrantExportAuthorizationRequest {
        request_id: rid("exp"),
        vendor: "nvidia".into(),
        product_sku: "H200-SXM-141GB".into(),
        destination: "CN".into(),
        reference: "BIS-H200-CN".into(),
    })
    .await
    .unwrap();
    let exports =
        c.list_export_authorizations(pb::ListExportAuthorizationsRequest::default()).await.unwrap().into_inner();
    assert_eq!(exports.authorizations.len(), 1);
    c.set_import_policy(pb::SetImportPolicyRequest {
        request_id: rid("pol"),
        product_sku: "H200-SXM-141GB".into(),
        stance: pb::ImportStance::Embargoed as i32,
        reason: "customs instruction to agents".into(),
    })
    .await
    .unwrap();
    let p = c
        .get_import_policy(pb::GetImportPolicyRequest { product_sku: "H200-SXM-141GB".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.policy.unwrap().stance(), pb::ImportStance::Embargoed);
    let never_set =
        c.get_import_policy(pb::GetImportPolicyRequest { product_sku: "H20".into() }).await.unwrap().into_inner();
    assert_eq!(never_set.policy.unwrap().stance(), pb::ImportStance::Open);
    assert_eq!(
        c.list_import_policies(pb::ListImportPoliciesRequest::default()).await.unwrap().into_inner().policies.len(),
        1
    );

    // Applications, the queue, a wave.
    let a = submit(&mut c, "bytedance", 200_000).await;
    let b = submit(&mut c, "alibaba", 120_000).await;
    let q = submit(&mut c, "moonshot", 10_000).await;
    let queue =
        c.list_queue(pb::ListQueueRequest { page_size: 2, page_token: String::new() }).await.unwrap().into_inner();
    assert_eq!(queue.total_queued, 3);
    assert_eq!(queue.applications.len(), 2);
    assert!(!queue.next_page_token.is_empty());
    let rest = c
        .list_queue(pb::ListQueueRequest { page_size: 2, page_token: queue.next_page_token })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.applications[0].application_id, q.application_id);
    assert_eq!(rest.applications[0].queue_position, 3);
    c.move_queued_application(pb::MoveQueuedApplicationRequest {
        request_id: rid("mv"),
        application_id: q.application_id.clone(),
        position: 2,
    })
    .await
    .unwrap();
    let got = c
        .get_application(pb::GetApplicationRequest { application_id: q.application_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.application.unwrap().queue_position, 2);
    let mine = c
        .list_applications(pb::ListApplicationsRequest { buyer_id: "alibaba".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.applications.len(), 1);

    let wave = c
        .create_wave(pb::CreateWaveRequest { request_id: rid("wave"), display_name: "Wave 1".into() })
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    for (app, units) in [(&a, 200_000), (&b, 120_000)] {
        c.add_wave_grant(pb::AddWaveGrantRequest {
            request_id: rid("grant"),
            wave_id: wave.wave_id.clone(),
            application_id: app.application_id.clone(),
            granted_units: units,
            conditions: Some(pb::LicenseConditions {
                terms_pending: true,
                domestic_ratio_bps: 1000,
                justification_required: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }
    c.add_wave_grant(pb::AddWaveGrantRequest {
        request_id: rid("grant"),
        wave_id: wave.wave_id.clone(),
        application_id: q.application_id.clone(),
        granted_units: 1,
        conditions: None,
    })
    .await
    .unwrap();
    c.remove_wave_grant(pb::RemoveWaveGrantRequest {
        request_id: rid("ungrant"),
        wave_id: wave.wave_id.clone(),
        application_id: q.application_id.clone(),
    })
    .await
    .unwrap();
    let published = c
        .publish_wave(pb::PublishWaveRequest { request_id: rid("pub"), wave_id: wave.wave_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.licenses.len(), 2);
    let lic = published.licenses[0].clone();
    let w = c.get_wave(pb::GetWaveRequest { wave_id: wave.wave_id.clone() }).await.unwrap().into_inner().wave.unwrap();
    assert_eq!(w.total_granted_units, 320_000);
    assert_eq!(c.list_waves(pb::ListWavesRequest::default()).await.unwrap().into_inner().waves.len(), 1);
    let by_wave = c
        .list_licenses(pb::ListLicensesRequest { wave_id: wave.wave_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_wave.licenses.len(), 2);
    let pending = c
        .list_licenses(pb::ListLicensesRequest { state: pb::LicenseState::PendingTerms as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.licenses.len(), 2);

    // Eligibility while terms are pending and customs embargoes: every failure is listed.
    let e = c
        .check_eligibility(pb::CheckEligibilityRequest {
            buyer_id: "bytedance".into(),
            product_sku: "H200-SXM-141GB".into(),
            units: 1000,
            justification: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let conds: Vec<pb::Condition> = e.failures.iter().map(|f| f.condition()).collect();
    assert_eq!(conds, vec![pb::Condition::ImportPolicy, pb::Condition::TermsFinal]);

    c.finalize_terms(pb::FinalizeTermsRequest {
        request_id: rid("fin"),
        license_id: lic.license_id.clone(),
        conditions: None,
    })
    .await
    .unwrap();
    c.set_import_policy(pb::SetImportPolicyRequest {
        request_id: rid("pol"),
        product_sku: "H200-SXM-141GB".into(),
        stance: pb::ImportStance::Open as i32,
        reason: "approvals granted".into(),
    })
    .await
    .unwrap();

    // Quota is taken in batches (the orders service's call): a refusal comes back per order, naming
    // each failed condition with its figures.
    let take = |order: &str, buyer: &str, units: u64, justification: &str| pb::BatchReserveQuotaRequest {
        request_id: String::new(),
        product_sku: "H200-SXM-141GB".into(),
        items: vec![pb::QuotaItem {
            order_id: order.into(),
            generation: 1,
            buyer_id: buyer.into(),
            units,
            justification: justification.into(),
            queued_behind: String::new(),
            judge_only: false,
        }],
        fence_token: 0,
    };
    let refused = c.batch_reserve_quota(take("ord-1", "bytedance", 1000, "")).await.unwrap().into_inner();
    let r = &refused.results[0];
    assert!(r.reservation.is_none());
    assert!(r.rejectable, "without a justification the order can never be served under this licence");
    let types: Vec<pb::Condition> = r.failures.iter().map(|f| f.condition()).collect();
    assert_eq!(types, [pb::Condition::DomesticRatio, pb::Condition::Justification]);
    assert_eq!((r.failures[0].required, r.failures[0].actual), (100, 0), "the ratio's figures");

    c.record_domestic_purchase(pb::RecordDomesticPurchaseRequest {
        request_id: rid("dom"),
        buyer_id: "bytedance".into(),
        units: 200,
        supplier: "huawei".into(),
        evidence_ref: "INV-1".into(),
    })
    .await
    .unwrap();
    let ledger = c
        .get_domestic_ledger(pb::GetDomesticLedgerRequest { buyer_id: "bytedance".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ledger.total_domestic_units, ledger.purchases.len()), (200, 1));
    let held = c
        .batch_reserve_quota(take("ord-1", "bytedance", 1000, "training run for a 400B model"))
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0)
        .reservation
        .unwrap();
    assert_eq!(held.state(), pb::ReservationState::Held);
    assert_eq!(held.wave_id, wave.wave_id);

    let pending = c.batch_reserve_quota(take("ord-2", "alibaba", 120_001, "x")).await.unwrap().into_inner();
    let types: Vec<pb::Condition> = pending.results[0].failures.iter().map(|f| f.condition()).collect();
    assert!(types.contains(&pb::Condition::TermsFinal), "alibaba's terms are still pending: {types:?}");
    let batch = c.batch_reserve_quota(take("ord-3", "bytedance", 5, "x")).await.unwrap().into_inner();
    assert!(batch.results[0].reservation.is_some());
    c.confirm_quota(pb::ConfirmQuotaRequest {
        request_id: rid("cq"),
        order_id: "ord-1".into(),
        generation: 1,
        product_sku: "H200-SXM-141GB".into(),
    })
    .await
    .unwrap();
    let r = c
        .get_quota_reservation(pb::GetQuotaReservationRequest {
            order_id: "ord-1".into(),
            product_sku: "H200-SXM-141GB".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reservation.unwrap().state(), pb::ReservationState::Confirmed);
    c.batch_release_quota(pb::BatchReleaseQuotaRequest {
        request_id: rid("rel"),
        items: vec![pb::ReleaseItem { order_id: "ord-3".into(), generation: 1, product_sku: "H200-SXM-141GB".into() }],
        reason: "cancelled".into(),
        unless_confirmed: false,
    })
    .await
    .unwrap();
    let released = c
        .batch_release_quota(pb::BatchReleaseQuotaRequest {
            request_id: String::new(),
            items: vec![pb::ReleaseItem {
                order_id: "ord-1".into(),
                generation: 1,
                product_sku: "H200-SXM-141GB".into(),
            }],
            reason: "unwind".into(),
            unless_confirmed: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.reservations[0].state(), pb::ReservationState::Confirmed, "confirmed quota stays");
    let l = c
        .get_license(pb::GetLicenseRequest { license_id: lic.license_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .license
        .unwrap();
    assert_eq!((l.used_units, l.confirmed_units, l.remaining_units), (1000, 1000, 199_000));

    // Suspend, reinstate, revoke; withdraw and reject.
    for call in 0..3 {
        let res = match call {
            0 => c
                .suspend_license(pb::SuspendLicenseRequest {
                    request_id: rid("s"),
                    license_id: lic.license_id.clone(),
                    reason: "r".into(),
                })
                .await
                .map(|r| r.into_inner().license.unwrap()),
            1 => c
                .reinstate_license(pb::ReinstateLicenseRequest {
                    request_id: rid("s"),
                    license_id: lic.license_id.clone(),
                    reason: "r".into(),
                })
                .await
                .map(|r| r.into_inner().license.unwrap()),
            _ => c
                .revoke_license(pb::RevokeLicenseRequest {
                    request_id: rid("s"),
                    license_id: lic.license_id.clone(),
                    reason: "r".into(),
                })
                .await
                .map(|r| r.into_inner().license.unwrap()),
        };
        let want = [pb::LicenseState::Suspended, pb::LicenseState::Active, pb::LicenseState::Revoked][call];
        assert_eq!(res.unwrap().state(), want);
    }
    c.withdraw_application(pb::WithdrawApplicationRequest {
        request_id: rid("w"),
        application_id: q.application_id.clone(),
        reason: "later".into(),
    })
    .await
    .unwrap();
    let gone = c
        .reject_application(pb::RejectApplicationRequest {
            request_id: rid("rj"),
            application_id: q.application_id.clone(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::FailedPrecondition);

    // Audit: each chain (the desk's, each product's) listed in order, and all of them verifying.
    let v = c.verify_audit_log(pb::VerifyAuditLogRequest::default()).await.unwrap().into_inner();
    assert!(v.valid, "{}", v.problem);
    let mut listed = 0;
    for product in ["", "H200-SXM-141GB"] {
        let audit = c
            .list_audit_entries(pb::ListAuditEntriesRequest {
                page_size: 1000,
                product_sku: product.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(audit.entries.len() > 5, "{product:?}: {}", audit.entries.len());
        assert_eq!(audit.entries[0].sequence, 1);
        assert!(audit.entries.windows(2).all(|w| w[1].prev_hash == w[0].hash && w[1].sequence == w[0].sequence + 1));
        listed += audit.entries.len();
    }
    let chains: Vec<&str> = v.chains.iter().map(|c| c.chain.as_str()).collect();
    assert!(chains.contains(&"{lic:H200-SXM-141GB}:audit") && chains.contains(&"{lic}:audit"), "{chains:?}");
    let other: u64 = v
        .chains
        .iter()
        .filter(|c| !c.chain.contains("H200-SXM-141GB") && c.chain != "{lic}:audit")
        .map(|c| c.entries_checked)
        .sum();
    assert_eq!(v.entries_checked as usize, listed + other as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verification_detects_edited_and_removed_entries() {
    let cluster = Cluster::start().await;
    let mut c = cluster.licensing_client();
    for buyer in ["bytedance", "alibaba", "tencent", "baidu"] {
        submit(&mut c, buyer, 10).await;
    }
    assert!(c.verify_audit_log(pb::VerifyAuditLogRequest::default()).await.unwrap().into_inner().valid);

    // Tamper directly in Redis, as an operator with database access could.
    let mut conn = cluster.redis.as_ref().unwrap().connection().await.unwrap();
    let stream = "{lic}:audit";
    let entries: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query_async(&mut conn).await.unwrap();
    assert_eq!(entries.ids.len(), 4);

    // Edit entry 3: remove entries 3..4 and append altered copies with the original chain fields.
    let copy: Vec<Vec<(String, Vec<u8>)>> = entries.ids[2..]
        .iter()
        .map(|e| {
            ["seq", "prev", "hash", "entry"]
                .iter()
                .map(|f| {
                    let v: Vec<u8> = redis::from_redis_value(e.map.get(*f).unwrap().clone()).unwrap();
                    (f.to_string(), v)
                })
                .collect()
        })
        .collect();
    for e in &entries.ids[2..] {
        let _: () = redis::cmd("XDEL").arg(stream).arg(&e.id).query_async(&mut conn).await.unwrap();
    }
    for (i, fields) in copy.iter().enumerate() {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (f, v) in fields {
            if i == 0 && f == "entry" {
                // Same entry with the buyer renamed.
                let mut entry = <pb::AuditEntry as prost::Message>::decode(v.as_slice()).unwrap();
                entry.detail = entry.detail.replace("tencent", "someone-else");
                cmd.arg(f).arg(prost::Message::encode_to_vec(&entry));
            } else {
                cmd.arg(f).arg(v.as_slice());
            }
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    let v = c.verify_audit_log(pb::VerifyAuditLogRequest::default()).await.unwrap().into_inner();
    assert!(!v.valid);
    assert_eq!(v.first_bad_sequence, 3);
    assert!(v.problem.contains("altered"), "{}", v.problem);

    // Remove entry 2 outright.
    let _: () = redis::cmd("XDEL").arg(stream).arg(&entries.ids[1].id).query_async(&mut conn).await.unwrap();
    let v = c.verify_audit_log(pb::VerifyAuditLogRequest::default()).await.unwrap().into_inner();
    assert!(!v.valid);
    assert_eq!(v.first_bad_sequence, 2);
    assert!(v.problem.contains("missing"), "{}", v.problem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_keep_their_details_and_calls_echo_the_request_id() {
    let cluster = Cluster::start().await;
    let mut c = cluster.licensing_client();
    let mut req = tonic::Request::new(pb::GetWaveRequest { wave_id: "wave-404".into() });
    req.metadata_mut().insert("x-request-id", "trace-me-1".parse().unwrap());
    let err = c.get_wave(req).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.get_error_details().resource_info().unwrap().resource_type, "wave");
    assert_eq!(err.metadata().get("x-request-id").unwrap(), "trace-me-1");

    let bad = c
        .list_applications(pb::ListApplicationsRequest {
            page_size: -3,
            page_token: "forged".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        bad.get_error_details().bad_request().unwrap().field_violations.iter().map(|f| f.field.clone()).collect();
    assert_eq!(fields, ["page_size", "page_token"]);

    let dup = c
        .submit_application(pb::SubmitApplicationRequest {
            request_id: "r1".into(),
            buyer_id: "b".into(),
            product_sku: "H200-SXM-141GB".into(),
            quantity: 1,
            end_use: "e".into(),
            site: "s".into(),
            destination: String::new(),
        })
        .await
        .unwrap();
    let ok = dup.metadata().get("x-request-id").is_some();
    assert!(ok, "responses carry a request id even when the caller sent none");
}
