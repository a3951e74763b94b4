//! Traces: a wave's propagation is one trace. The publish call's context is stored in the licensing
//! stream entry; the orders consumer continues it, its marks carry it to the reconciliation round, the
//! round's quota and stock calls carry it in gRPC metadata, and the order transitions it commits carry
//! it in their stream entry. Spans are exported through OpenTelemetry to an in-memory exporter and
//! the parent links are checked span by span.
//!
//! (Its own test binary: the exporter is part of the process-wide tracing subscriber.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "suite/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_runtime::telemetry;
use chipgate_state::Backend;
use common::{H200, World, rid};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use prost::Message;

/// Keeps every exported span.
#[derive(Clone, Debug, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collect {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Collect {
    fn spans(&self) -> Vec<SpanData> {
        self.0.lock().unwrap().clone()
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn in_trace(spans: &[SpanData], trace: TraceId) -> Vec<&SpanData> {
    spans.iter().filter(|s| s.span_context.trace_id() == trace).collect()
}

fn named<'a>(spans: &[&'a SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().copied().filter(|s| s.name == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_propagates_as_one_trace() {
    let exporter = Collect::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let _guard = telemetry::init_for_tests_with_provider(provider);
    assert!(telemetry::otel_enabled(), "this test binary installs the exporter first");

    let mut w = World::start().await;
    w.export(H200).await;
    let app = w.apply("alpha", H200, 100).await;
    w.receive(H200, 20).await;
    let ids = vec![w.place("alpha", H200, 10).await.order_id, w.place("alpha", H200, 10).await.order_id];
    // Draft the wave, then publish it from a caller with a known trace.
    let wave = w
        .lic
        .create_wave(lpb::CreateWaveRequest { request_id: rid("wave"), display_name: "w".into() })
        .await
        .unwrap()
        .into_inner()
        .wave
        .unwrap();
    w.lic
        .add_wave_grant(lpb::AddWaveGrantRequest {
            request_id: rid("grant"),
            wave_id: wave.wave_id.clone(),
            application_id: app,
            granted_units: 100,
            conditions: Some(lpb::LicenseConditions::default()),
        })
        .await
        .unwrap();
    // Let the placements' own rounds finish, so the wave's round has only the wave's marks: a round
    // continues the trace of one of its marks (the others become links), so a placement's mark left
    // over on a loaded machine could be the one it continues. Wait until the orders wait for a licence,
    // the export authorisation's event has been consumed (orders finds a new product's licensing stream
    // within about 2 s, so its mark can come late), and the product has no marks left.
    w.until(&ids, Duration::from_secs(15), |os| common::all_in(os, opb::OrderState::AwaitingLicense)).await;
    let consumed_export = || {
        exporter.spans().iter().any(|s| {
            s.name == "consume event"
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "detail" && kv.value.to_string() == "export_authorization_changed")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !consumed_export() {
        assert!(Instant::now() < deadline, "the export authorisation's event was never consumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h200 = chipgate_domain::ids::Sku::from_trusted(H200);
    let (dirty, working) = (chipgate_orders::keys::dirty(&h200), chipgate_orders::keys::working(&h200));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let marks = w.cluster.store.hgetall(&dirty).await.unwrap().len()
            + w.cluster.store.hgetall(&working).await.unwrap().len();
        if marks == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the placements' rounds never finished: {marks} marks left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut req =
        tonic::Request::new(lpb::PublishWaveRequest { request_id: rid("pub"), wave_id: wave.wave_id.clone() });
    req.metadata_mut().insert("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap());
    w.lic.publish_wave(req).await.unwrap();
    w.until(&ids, Duration::from_secs(15), |os| common::all_in(os, opb::OrderState::Reserved)).await;

    let trace = TraceId::from_hex(TRACE).unwrap();
    // Spans end (and are exported) as the work finishes; wait for the whole chain.
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let all = exporter.spans();
        let t = in_trace(&all, trace);
        let done = !named(&t, "reconcile round").is_empty()
            && !named(&t, "/chipgate.licensing.v1.LicensingService/BatchReserveQuota").is_empty();
        if done || Instant::now() > deadline {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t = in_trace(&spans, trace);
    let names: Vec<&str> = t.iter().map(|s| s.name.as_ref()).collect();

    // 1. The publish call is a child of the caller's span.
    let publish = named(&t, "/chipgate.licensing.v1.LicensingService/PublishWave");
    assert_eq!(publish.len(), 1, "spans in the trace: {names:?}");
    let publish = publish[0];
    assert_eq!(publish.parent_span_id, SpanId::from_hex(CALLER_SPAN).unwrap());
    let publish_id = publish.span_context.span_id();

    // 2. The licensing stream entry (in the product's stream: a wave is put in force product by
    // product) carries the publish span's context.
    let stream = chipgate_contract::streams::licensing_product(&chipgate_domain::ids::Sku::from_trusted(H200));
    let entries = w.cluster.store.xrange(&stream, None, 1000).await.unwrap();
    let published: Vec<lpb::LicensingEvent> = entries
        .iter()
        .filter_map(|e| lpb::LicensingEvent::decode(e.field("e")?).ok())
        .filter(|e| matches!(e.kind, Some(lpb::licensing_event::Kind::WavePublished(_))))
        .collect();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].traceparent, format!("00-{TRACE}-{publish_id}-01"));

    // 3. The orders consumer handled that entry in a child span of the publish call.
    // (The publication's desk event, `wave_changed`, is consumed under it too.)
    let detail = |s: &SpanData| {
        s.attributes.iter().find(|kv| kv.key.as_str() == "detail").map(|kv| kv.value.to_string()).unwrap_or_default()
    };
    let consumed: Vec<&SpanData> = named(&t, "consume event")
        .into_iter()
        .filter(|s| s.parent_span_id == publish_id && detail(s) == "wave_published")
        .collect();
    assert_eq!(consumed.len(), 1, "one consumer span of WavePublished under the publish call; trace has {names:?}");
    let consume_id = consumed[0].span_context.span_id();

    // 4. The round that moved the orders continues from the consumer (via the product's marks).
    let rounds: Vec<&SpanData> =
        named(&t, "reconcile round").into_iter().filter(|s| s.parent_span_id == consume_id).collect();
    assert!(!rounds.is_empty(), "a round under the consumer span; trace has {names:?}");
    let round_ids: Vec<SpanId> = rounds.iter().map(|s| s.span_context.span_id()).collect();

    // 5. The round's quota and stock calls are server spans in licensing and inventory, children of it.
    for method in [
        "/chipgate.licensing.v1.LicensingService/BatchReserveQuota",
        "/chipgate.inventory.v1.InventoryService/BatchReserve",
    ] {
        let calls = named(&t, method);
        assert!(
            calls.iter().any(|c| round_ids.contains(&c.parent_span_id)),
            "{method} under a round span; trace has {names:?}"
        );
    }

    // 6. The transitions the round committed carry its context in the orders stream entry.
    let batches = w
        .cluster
        .store
        .xrange(&chipgate_orders::keys::events(&chipgate_domain::ids::Sku::from_trusted(H200)), None, 1000)
        .await
        .unwrap();
    let traced: Vec<chipgate_orders::EventBatch> = batches
        .iter()
        .filter_map(|e| chipgate_orders::EventBatch::decode(e.field("b")?).ok())
        .filter(|b| b.traceparent.contains(TRACE))
        .collect();
    let moved: Vec<&str> = traced
        .iter()
        .flat_map(|b| &b.items)
        .filter(|i| i.transition.as_ref().is_some_and(|t| t.to_state() == opb::OrderState::Reserved))
        .map(|i| i.order_id.as_str())
        .collect();
    for id in &ids {
        assert!(moved.contains(&id.as_str()), "order {id}'s move to RESERVED is in a stream entry of the wave's trace");
    }
    assert!(
        traced.iter().all(|b| round_ids.iter().any(|r| b.traceparent == format!("00-{TRACE}-{r}-01"))),
        "the entries name the round span as their cause"
    );
}
