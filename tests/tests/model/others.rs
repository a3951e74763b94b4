//! Customs (embargoes and lifts), the export authority (grants and revocations per product and
//! destination) and the vendor (supply receipts, shipments, rebooked receipts): each one sequential
//! client that owns its part of the world, so the model knows every answer.

use std::time::Duration;

use chipgate_proto::inventory::v1 as ipb;
use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::orders::v1 as opb;
use chipgate_proto::orders::v1::OrderState;
use chipgate_runtime::auth::Role;
use fastrand::Rng;
use tonic::Code;

use crate::calls::Mode;
use crate::model::{Timeline, now_ms};
use crate::world::{BUYERS, Ctx, DESTINATIONS, PRODUCTS, Party};
use crate::{send, send_ord};

/// Customs until the run stops: embargoes a product now and then and lifts it again.
pub async fn customs(ctx: Ctx) {
    let party = Party::role(&ctx.urls, &ctx.signer, Role::Customs);
    let mut rng = Rng::with_seed(ctx.seed ^ 0x0c05_70e5);
    while !ctx.stopped() {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..1600))).await;
        let sku = PRODUCTS[rng.usize(..PRODUCTS.len())];
        let embargoed = ctx.model.lock().unwrap().embargoed_now(sku);
        let roll = rng.u8(..100);
        if roll < 6 {
            let msg = lpb::SetImportPolicyRequest {
                request_id: ctx.rid("policy-bad"),
                product_sku: sku.into(),
                stance: lpb::ImportStance::Unspecified as i32,
                reason: String::new(),
            };
            let r = ctx
                .call(
                    "SetImportPolicy",
                    Mode::Once,
                    send!(party.lic, set_import_policy, msg),
                    |a: &lpb::SetImportPolicyResponse, b| a == b,
                )
                .await;
            ctx.expect("SetImportPolicy", "(bad: no stance)", &r, false, &[Code::InvalidArgument]);
            if r.is_err() {
                ctx.model.lock().unwrap().refused.push(msg.request_id);
            }
        } else if (embargoed && roll < 65) || (!embargoed && roll < 35) {
            set_policy(&ctx, &party, &mut rng, sku, !embargoed).await;
        }
    }
}

/// Sets a product's import policy and books it.
pub async fn set_policy(ctx: &Ctx, party: &Party, rng: &mut Rng, sku: &str, embargo: bool) {
    let stance = if embargo { lpb::ImportStance::Embargoed } else { lpb::ImportStance::Open };
    let msg = lpb::SetImportPolicyRequest {
        request_id: ctx.rid("policy"),
        product_sku: sku.into(),
        stance: stance as i32,
        reason: if embargo { "customs notice".into() } else { "notice lifted".into() },
    };
    let from = now_ms();
    let mode = Mode::pick(rng);
    let r = ctx
        .call(
            "SetImportPolicy",
            mode,
            send!(party.lic, set_import_policy, msg),
            |a: &lpb::SetImportPolicyResponse, b| a == b,
        )
        .await;
    let to = now_ms();
    ctx.expect("SetImportPolicy", &format!("{sku} {stance:?}"), &r, true, &[]);
    if let Ok(p) = r {
        let got = p.policy.unwrap_or_default();
        let mut m = ctx.model.lock().unwrap();
        if got.stance() != stance || got.product_sku != sku {
            m.violation(format!("SetImportPolicy {sku}: answered {got:?}"));
        }
        m.embargo.entry(sku.to_string()).or_insert_with(|| Timeline::new(false)).set(from, to, embargo);
        m.audited.push((party.subject.clone(), msg.request_id.clone(), "customs"));
    }
}

/// The export authority until the run stops: revokes and grants authorisations per product and
/// destination.
pub async fn exports(ctx: Ctx) {
    let party = Party::role(&ctx.urls, &ctx.signer, Role::ExportAuthority);
    let mut rng = Rng::with_seed(ctx.seed ^ 0xe4e4);
    while !ctx.stopped() {
        tokio::time::sleep(Duration::from_millis(rng.u64(600..2000))).await;
        let sku = PRODUCTS[rng.usize(..PRODUCTS.len())];
        let dest = if rng.u8(..100) < 70 { DESTINATIONS[0] } else { DESTINATIONS[1] };
        let now = ctx.model.lock().unwrap().export_now(sku, dest);
        let roll = rng.u8(..100);
        match (now, roll) {
            (_, 0..=5) => {
                let msg = lpb::GrantExportAuthorizationRequest {
                    request_id: ctx.rid("export-bad"),
                    vendor: "nvidia".into(),
                    product_sku: sku.into(),
                    destination: "China".into(),
                    reference: "BIS".into(),
                };
                let r = ctx
                    .call(
                        "GrantExportAuthorization",
                        Mode::Once,
                        send!(party.lic, grant_export_authorization, msg),
                        |a: &lpb::GrantExportAuthorizationResponse, b| a == b,
                    )
                    .await;
                ctx.expect(
                    "GrantExportAuthorization",
                    "(bad: destination not a country code)",
                    &r,
                    false,
                    &[Code::InvalidArgument],
                );
                if r.is_err() {
                    ctx.model.lock().unwrap().refused.push(msg.request_id);
                }
            }
            (_, 6..=10) => revoke_export(&ctx, &party, &mut rng, sku, "JP").await,
            (Some(true), 11..=45) => revoke_export(&ctx, &party, &mut rng, sku, dest).await,
            (Some(true), 46..=52) | (Some(false) | None, 11..=75) => {
                grant_export(&ctx, &party, &mut rng, sku, dest).await
            }
            (Some(false) | None, 76..=85) => revoke_export(&ctx, &party, &mut rng, sku, dest).await,
            _ => {}
        }
    }
}

/// Grants an export authorisation and books it.
pub async fn grant_export(ctx: &Ctx, party: &Party, rng: &mut Rng, sku: &str, dest: &str) {
    let msg = lpb::GrantExportAuthorizationRequest {
        request_id: ctx.rid("export"),
        vendor: "nvidia".into(),
        product_sku: sku.into(),
        destination: dest.into(),
        reference: format!("BIS-{}", rng.u16(..)),
    };
    let from = now_ms();
    let mode = Mode::pick(rng);
    let r = ctx
        .call(
            "GrantExportAuthorization",
            mode,
            send!(party.lic, grant_export_authorization, msg),
            |a: &lpb::GrantExportAuthorizationResponse, b| a == b,
        )
        .await;
    let to = now_ms();
    ctx.expect("GrantExportAuthorization", &format!("{sku}/{dest}"), &r, true, &[]);
    if let Ok(g) = r {
        let a = g.authorization.unwrap_or_default();
        let mut m = ctx.model.lock().unwrap();
        if !a.active || a.product_sku != sku || a.destination != dest {
            m.violation(format!("GrantExportAuthorization {sku}/{dest}: answered {a:?}"));
        }
        m.exports.entry((sku.to_string(), dest.to_string())).or_insert_with(|| Timeline::new(None)).set(
            from,
            to,
            Some(true),
        );
        m.audited.push((party.subject.clone(), msg.request_id.clone(), "export.granted"));
    }
}

async fn revoke_export(ctx: &Ctx, party: &Party, rng: &mut Rng, sku: &str, dest: &str) {
    let now = ctx.model.lock().unwrap().export_now(sku, dest);
    let msg = lpb::RevokeExportAuthorizationRequest {
        request_id: ctx.rid("unexport"),
        product_sku: sku.into(),
        destination: dest.into(),
        reason: "policy review".into(),
    };
    let from = now_ms();
    let mode = Mode::pick(rng);
    let r = ctx
        .call(
            "RevokeExportAuthorization",
            mode,
            send!(party.lic, revoke_export_authorization, msg),
            |a: &lpb::RevokeExportAuthorizationResponse, b| a == b,
        )
        .await;
    let to = now_ms();
    match now {
        Some(true) => ctx.expect("RevokeExportAuthorization", &format!("{sku}/{dest}"), &r, true, &[]),
        Some(false) => ctx.expect(
            "RevokeExportAuthorization",
            &format!("{sku}/{dest} (revoked)"),
            &r,
            false,
            &[Code::FailedPrecondition],
        ),
        None => ctx.expect(
            "RevokeExportAuthorization",
            &format!("{sku}/{dest} (never granted)"),
            &r,
            false,
            &[Code::NotFound],
        ),
    };
    let mut m = ctx.model.lock().unwrap();
    match r {
        Ok(g) => {
            let a = g.authorization.unwrap_or_default();
            if a.active {
                m.violation(format!("RevokeExportAuthorization {sku}/{dest}: still active"));
            }
            m.exports.entry((sku.to_string(), dest.to_string())).or_insert_with(|| Timeline::new(None)).set(
                from,
                to,
                Some(false),
            );
            m.audited.push((party.subject.clone(), msg.request_id.clone(), "export.revoked"));
        }
        Err(_) => m.refused.push(msg.request_id),
    }
}

/// The vendor until the run stops: books supply, ships confirmed orders, rebooks receipts.
pub async fn vendor(ctx: Ctx) {
    let party = Party::role(&ctx.urls, &ctx.signer, Role::Vendor);
    let mut rng = Rng::with_seed(ctx.seed ^ 0x007e_4d0a);
    while !ctx.stopped() {
        tokio::time::sleep(Duration::from_millis(rng.u64(100..300))).await;
        match rng.u8(..100) {
            0..=34 => {
                let sku = PRODUCTS[rng.usize(..PRODUCTS.len())];
                let units = rng.u64(2..=20) * 10;
                receive(&ctx, &party, &mut rng, sku, units).await;
            }
            35..=81 => ship(&ctx, &party, &mut rng).await,
            82..=84 => allocation_policy(&ctx, &party, &mut rng).await,
            85..=89 => rebook(&ctx, &party, &mut rng).await,
            _ => bad(&ctx, &party, &mut rng).await,
        }
    }
}

/// Changes a product's allocation policy: FIFO or pro rata, with or without a per-buyer cap (what the
/// settled checks then hold the backlog to is read back from the service).
async fn allocation_policy(ctx: &Ctx, party: &Party, rng: &mut Rng) {
    let sku = PRODUCTS[rng.usize(..PRODUCTS.len())];
    let strategy = if rng.bool() { opb::AllocationStrategy::Fifo } else { opb::AllocationStrategy::ProRata };
    let cap = [0, 0, 34, 50, 75][rng.usize(..5)];
    let msg = opb::SetAllocationPolicyRequest {
        request_id: ctx.rid("allocation-policy"),
        product_sku: sku.into(),
        strategy: strategy as i32,
        max_share_percent: cap,
        reason: "model".into(),
    };
    let mode = Mode::pick(rng);
    let r = ctx
        .call(
            "SetAllocationPolicy",
            mode,
            send_ord!(party, set_allocation_policy, msg),
            |a: &opb::SetAllocationPolicyResponse, b| a == b,
        )
        .await;
    if ctx.expect("SetAllocationPolicy", &format!("{sku}: {} cap {cap}", strategy.as_str_name()), &r, true, &[])
        && let Ok(x) = r
        && x.policy.as_ref().map(|p| (p.strategy, p.max_share_percent)) != Some((strategy as i32, cap))
    {
        ctx.violation(format!("SetAllocationPolicy {sku}: acknowledged, but the policy is {:?}", x.policy));
    }
}

/// Books a new receipt.
pub async fn receive(ctx: &Ctx, party: &Party, rng: &mut Rng, sku: &str, units: u64) {
    let msg = ipb::ReceiveSupplyRequest {
        request_id: ctx.rid("receive"),
        receipt_id: ctx.rid("rcpt"),
        product_sku: sku.into(),
        units,
        source: "air freight".into(),
    };
    *ctx.model.lock().unwrap().receiving.entry(sku.to_string()).or_default() += units;
    let mode = Mode::pick(rng);
    let r = ctx
        .call("ReceiveSupply", mode, send!(party.inv, receive_supply, msg), |a: &ipb::ReceiveSupplyResponse, b| a == b)
        .await;
    ctx.expect("ReceiveSupply", &format!("{units} x {sku}"), &r, true, &[]);
    let mut m = ctx.model.lock().unwrap();
    *m.receiving.entry(sku.to_string()).or_default() -= units;
    if let Ok(x) = r {
        if !x.newly_booked || x.receipt.as_ref().map(|r| r.units) != Some(units) {
            m.violation(format!(
                "ReceiveSupply {}: answered newly_booked {} {:?}",
                msg.receipt_id, x.newly_booked, x.receipt
            ));
        }
        m.receipts.insert(msg.receipt_id.clone(), (sku.to_string(), units));
    }
}

async fn rebook(ctx: &Ctx, party: &Party, rng: &mut Rng) {
    let earlier = {
        let m = ctx.model.lock().unwrap();
        let v: Vec<(String, String, u64)> = m.receipts.iter().map(|(id, (s, u))| (id.clone(), s.clone(), *u)).collect();
        (!v.is_empty()).then(|| v[rng.usize(..v.len())].clone())
    };
    let Some((receipt, sku, units)) = earlier else { return };
    let other = rng.bool();
    let msg = ipb::ReceiveSupplyRequest {
        request_id: ctx.rid("receive-again"),
        receipt_id: receipt.clone(),
        product_sku: sku,
        units: if other { units + 10 } else { units },
        source: "air freight".into(),
    };
    let r = ctx
        .call(
            "ReceiveSupply",
            Mode::Once,
            send!(party.inv, receive_supply, msg),
            |a: &ipb::ReceiveSupplyResponse, b| a == b,
        )
        .await;
    if other {
        ctx.expect("ReceiveSupply", &format!("{receipt} again with other figures"), &r, false, &[Code::AlreadyExists]);
    } else if ctx.expect("ReceiveSupply", &format!("{receipt} again"), &r, true, &[])
        && let Ok(x) = r
        && x.newly_booked
    {
        ctx.violation(format!("ReceiveSupply {receipt} again: booked a second time"));
    }
}

async fn ship(ctx: &Ctx, party: &Party, rng: &mut Rng) {
    let pick = {
        let m = ctx.model.lock().unwrap();
        let v: Vec<String> = m
            .orders
            .values()
            .filter(|o| o.confirmed.is_some() && o.shipped.is_none() && o.cancelled.is_none() && !o.c.busy())
            .map(|o| o.id.clone())
            .collect();
        (!v.is_empty()).then(|| v[rng.usize(..v.len())].clone())
    };
    let Some(id) = pick else { return };
    ship_one(ctx, party, rng, &id).await;
}

/// Ships a confirmed order and books it.
pub async fn ship_one(ctx: &Ctx, party: &Party, rng: &mut Rng, id: &str) {
    let began = ctx.model.lock().unwrap().orders.get_mut(id).expect("known order").c.begin();
    let msg = opb::ShipOrderRequest { request_id: ctx.rid("ship"), order_id: id.into() };
    let mode = Mode::pick(rng);
    let r = ctx
        .call("ShipOrder", mode, send_ord!(party, ship_order, msg), |a: &opb::ShipOrderResponse, b| {
            a.order.as_ref().map(|o| &o.order_id) == b.order.as_ref().map(|o| &o.order_id)
        })
        .await;
    let (contended, cancelled) = {
        let mut m = ctx.model.lock().unwrap();
        let o = m.orders.get_mut(id).expect("known order");
        (o.c.end(began), o.cancelled.is_some())
    };
    if contended {
        // The buyer's cancel raced it: one of the two wins.
        ctx.expect("ShipOrder", id, &r, true, &[Code::FailedPrecondition]);
    } else if cancelled {
        ctx.expect("ShipOrder", &format!("{id} (cancelled)"), &r, false, &[Code::FailedPrecondition]);
    } else {
        ctx.expect("ShipOrder", &format!("{id} (confirmed)"), &r, true, &[]);
    }
    if let Ok(s) = r {
        let o = s.order.unwrap_or_default();
        let mut m = ctx.model.lock().unwrap();
        if o.state() != OrderState::Shipped {
            m.violation(format!("ShipOrder {id}: acknowledged, but the order is {:?}", o.state()));
        }
        m.orders.get_mut(id).expect("known order").shipped.get_or_insert(now_ms());
    }
}

async fn bad(ctx: &Ctx, party: &Party, rng: &mut Rng) {
    match rng.u8(..5) {
        0 | 1 => {
            let zero = rng.bool();
            let msg = ipb::ReceiveSupplyRequest {
                request_id: ctx.rid("receive-bad"),
                receipt_id: ctx.rid("rcpt-bad"),
                product_sku: if zero { PRODUCTS[0].into() } else { "H900-NOPE".into() },
                units: if zero { 0 } else { 10 },
                source: String::new(),
            };
            let r = ctx
                .call(
                    "ReceiveSupply",
                    Mode::Once,
                    send!(party.inv, receive_supply, msg),
                    |a: &ipb::ReceiveSupplyResponse, b| a == b,
                )
                .await;
            ctx.expect(
                "ReceiveSupply",
                if zero { "(bad: zero units)" } else { "(bad: unknown product)" },
                &r,
                false,
                &[Code::InvalidArgument, Code::NotFound],
            );
        }
        2 => {
            let pick = {
                let m = ctx.model.lock().unwrap();
                let v: Vec<String> = m
                    .orders
                    .values()
                    .filter(|o| o.cancelled.is_some() && o.shipped.is_none() && !o.c.busy())
                    .map(|o| o.id.clone())
                    .collect();
                (!v.is_empty()).then(|| v[rng.usize(..v.len())].clone())
            };
            let Some(id) = pick else { return };
            let msg = opb::ShipOrderRequest { request_id: ctx.rid("ship-bad"), order_id: id.clone() };
            let r = ctx
                .call("ShipOrder", Mode::Once, send_ord!(party, ship_order, msg), |a: &opb::ShipOrderResponse, b| {
                    a == b
                })
                .await;
            ctx.expect("ShipOrder", &format!("(bad: {id} is cancelled)"), &r, false, &[Code::FailedPrecondition]);
        }
        3 => {
            let msg = opb::ShipOrderRequest { request_id: ctx.rid("ship-bad"), order_id: "ord-999999999".into() };
            let r = ctx
                .call("ShipOrder", Mode::Once, send_ord!(party, ship_order, msg), |a: &opb::ShipOrderResponse, b| {
                    a == b
                })
                .await;
            ctx.expect("ShipOrder", "(bad: unknown order)", &r, false, &[Code::NotFound]);
        }
        _ => {
            let msg = opb::PlaceOrderRequest {
                request_id: ctx.rid("place-bad"),
                buyer_id: BUYERS[1].into(),
                product_sku: PRODUCTS[0].into(),
                units: 10,
                justification: String::new(),
            };
            let r = ctx
                .call("PlaceOrder", Mode::Once, send_ord!(party, place_order, msg), |a: &opb::PlaceOrderResponse, b| {
                    a == b
                })
                .await;
            ctx.expect("PlaceOrder", "(bad: by the vendor)", &r, false, &[Code::PermissionDenied]);
        }
    }
}
