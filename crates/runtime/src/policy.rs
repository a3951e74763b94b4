//! Who may call what: the one authorisation table of the cluster, so that a reviewer reads every
//! RPC's rule in one place and a test can hold every RPC in the descriptor set against it.
//!
//! Each RPC lists the non-buyer roles it admits and how it treats buyers:
//! * [`BuyerAccess::Denied`]: buyers may not call it at all;
//! * [`BuyerAccess::Open`]: buyers may call it (public figures such as the catalogue);
//! * [`BuyerAccess::Field`]: the request names a buyer in the given top-level string field, and it must
//!   be the token's buyer; the edge reads that field from the request message itself (see
//!   [`string_field`]) before the handler runs;
//! * [`BuyerAccess::Owner`]: the request names a resource by id (field given); the handler loads it and
//!   refuses another buyer's with [`crate::RequestContext::check_owner`].
//!
//! An RPC missing from the table is refused to everybody (fail closed); health and reflection are open
//! and never reach this table.

use crate::auth::Role;

use Role::{Auditor as AU, Customs as CU, ExportAuthority as EA, ImportAuthority as IA, Service as SV, Vendor as VE};

/// How an RPC treats buyers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuyerAccess {
    /// Buyers may not call it.
    Denied,
    /// Any buyer may call it.
    Open,
    /// The top-level string field with this number must be the token's buyer id.
    Field(u32),
    /// The resource named by the top-level string field with this number must belong to the buyer
    /// (checked by the handler).
    Owner(u32),
}

/// The rule of one RPC.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// Non-buyer roles that may call it.
    pub roles: &'static [Role],
    /// How buyers are treated.
    pub buyer: BuyerAccess,
}

const fn r(roles: &'static [Role], buyer: BuyerAccess) -> Rule {
    Rule { roles, buyer }
}

const LIC: &str = "/chipgate.licensing.v1.LicensingService/";
const INV: &str = "/chipgate.inventory.v1.InventoryService/";
const ORD: &str = "/chipgate.orders.v1.OrderService/";

/// Every party but buyers (reads anyone may make; buyers are admitted with [`BuyerAccess::Open`]).
/// Not the `service` role: it is granted exactly the calls the orders service makes (a test holds the
/// table to orders' code), so a leaked service token reads no more than it must.
const EVERYONE: &[Role] = &[IA, EA, CU, VE, AU];

use BuyerAccess::{Denied, Field, Open, Owner};

/// The table: `(service prefix, method, rule)`.
pub static TABLE: &[(&str, &str, Rule)] = &[
    // Applications and the approval queue.
    (LIC, "SubmitApplication", r(&[], Field(2))),
    (LIC, "GetApplication", r(&[IA, AU], Owner(1))),
    (LIC, "ListApplications", r(&[IA, AU], Field(1))),
    (LIC, "WithdrawApplication", r(&[], Owner(2))),
    (LIC, "RejectApplication", r(&[IA], Denied)),
    (LIC, "ListQueue", r(&[IA, AU], Denied)),
    (LIC, "MoveQueuedApplication", r(&[IA], Denied)),
    // Waves: only the import authority drafts and publishes them.
    (LIC, "CreateWave", r(&[IA], Denied)),
    (LIC, "AddWaveGrant", r(&[IA], Denied)),
    (LIC, "RemoveWaveGrant", r(&[IA], Denied)),
    (LIC, "PublishWave", r(&[IA], Denied)),
    (LIC, "GetWave", r(&[IA, AU], Denied)),
    (LIC, "ListWaves", r(&[IA, AU], Denied)),
    // Licences.
    (LIC, "GetLicense", r(&[IA, AU], Owner(1))),
    (LIC, "ListLicenses", r(&[IA, AU], Field(1))),
    (LIC, "FinalizeTerms", r(&[IA], Denied)),
    (LIC, "SuspendLicense", r(&[IA], Denied)),
    (LIC, "ReinstateLicense", r(&[IA], Denied)),
    (LIC, "RevokeLicense", r(&[IA], Denied)),
    (LIC, "CheckEligibility", r(&[IA, AU], Field(1))),
    // Quota: the orders service's internal calls.
    (LIC, "BatchReserveQuota", r(&[SV], Denied)),
    (LIC, "BatchReleaseQuota", r(&[SV], Denied)),
    (LIC, "ConfirmQuota", r(&[SV], Denied)),
    (LIC, "GetQuotaReservation", r(&[IA, AU], Denied)),
    (LIC, "RecheckQuota", r(&[SV], Denied)),
    // What a draft wave would do to quota: asked by orders' PreviewWave (and the authority drafting it).
    (LIC, "PreviewWaveQuota", r(&[SV, IA], Denied)),
    // The domestic-purchase ledger: recorded by the import authority from evidence.
    (LIC, "RecordDomesticPurchase", r(&[IA], Denied)),
    (LIC, "GetDomesticLedger", r(&[IA, AU], Field(1))),
    // Export side: only the export authority grants and revokes.
    (LIC, "GrantExportAuthorization", r(&[EA], Denied)),
    (LIC, "RevokeExportAuthorization", r(&[EA], Denied)),
    (LIC, "ListExportAuthorizations", r(&[EA, IA, VE, CU, AU], Denied)),
    // Customs: only customs sets import policy; policy is public.
    (LIC, "SetImportPolicy", r(&[CU], Denied)),
    (LIC, "GetImportPolicy", r(EVERYONE, Open)),
    (LIC, "ListImportPolicies", r(EVERYONE, Open)),
    // The audit log.
    (LIC, "ListAuditEntries", r(&[AU, IA], Denied)),
    (LIC, "VerifyAuditLog", r(&[AU, IA], Denied)),
    (LIC, "GetAuditCheckpoint", r(&[AU, IA], Denied)),
    // Inventory: the vendor runs the catalogue and supply; reservations are internal.
    (INV, "UpsertProduct", r(&[VE], Denied)),
    (INV, "GetProduct", r(EVERYONE, Open)),
    (INV, "ListProducts", r(EVERYONE, Open)),
    (INV, "ReceiveSupply", r(&[VE], Denied)),
    // Orders reads a product's free stock to share it under an allocation policy, and for previews.
    (INV, "GetStock", r(&[IA, EA, CU, VE, AU, SV], Open)),
    (INV, "ListStock", r(EVERYONE, Open)),
    (INV, "BatchReserve", r(&[SV], Denied)),
    (INV, "ConfirmReservation", r(&[SV], Denied)),
    (INV, "BatchReleaseReservations", r(&[SV], Denied)),
    (INV, "ShipReservation", r(&[SV], Denied)),
    (INV, "GetReservation", r(&[VE, AU], Denied)),
    (INV, "ListReservations", r(&[VE, AU], Denied)),
    (INV, "WatchStock", r(EVERYONE, Open)),
    // Orders: buyers place and act on their own; the vendor ships.
    (ORD, "PlaceOrder", r(&[], Field(2))),
    (ORD, "GetOrder", r(&[VE, IA, AU], Owner(1))),
    (ORD, "ListOrders", r(&[VE, IA, AU], Field(1))),
    (ORD, "CancelOrder", r(&[], Owner(2))),
    (ORD, "ConfirmOrder", r(&[], Owner(2))),
    (ORD, "ShipOrder", r(&[VE], Denied)),
    (ORD, "WatchOrders", r(&[VE, IA, AU], Field(1))),
    (ORD, "GetBacklog", r(&[VE, IA, AU], Denied)),
    (ORD, "GetWaveProgress", r(&[IA, AU, VE], Denied)),
    // Allocation policies: the vendor shares its stock; how it does is open to the other parties.
    (ORD, "SetAllocationPolicy", r(&[VE], Denied)),
    (ORD, "GetAllocationPolicy", r(&[VE, IA, AU], Denied)),
    // "What if": the authority previews its draft waves, the vendor its shipments (both see both).
    (ORD, "PreviewWave", r(&[IA, VE], Denied)),
    (ORD, "PreviewSupply", r(&[VE, IA], Denied)),
];

/// The rule of the RPC at `path` (`/pkg.Service/Method`), if it has one.
pub fn rule(path: &str) -> Option<&'static Rule> {
    TABLE.iter().find(|(svc, method, _)| path.strip_prefix(svc) == Some(method)).map(|(_, _, rule)| rule)
}

/// What the table says about a caller before looking at the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Let a buyer through to a resource named by id: the handler checks it is the buyer's, and a
    /// missing one must be refused like another buyer's (so ids can't be probed for existence).
    AllowOwned,
    /// Let it through if the top-level string field with this number is the caller's buyer id.
    CheckField(u32),
    /// Refuse.
    Deny,
}

/// The decision for `role` calling `path`.
pub fn decide(path: &str, role: Role) -> Decision {
    let Some(rule) = rule(path) else {
        return Decision::Deny;
    };
    if role == Role::Buyer {
        return match rule.buyer {
            BuyerAccess::Denied => Decision::Deny,
            BuyerAccess::Open => Decision::Allow,
            BuyerAccess::Owner(_) => Decision::AllowOwned,
            BuyerAccess::Field(n) => Decision::CheckField(n),
        };
    }
    if rule.roles.contains(&role) { Decision::Allow } else { Decision::Deny }
}

fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The value of the top-level string field `field` in the protobuf message `msg` (the last one wins,
/// as in protobuf), `Some("")` when absent, or None when the message is malformed.
pub fn string_field(msg: &[u8], field: u32) -> Option<String> {
    let mut at = 0usize;
    let mut found: Option<&[u8]> = None;
    while at < msg.len() {
        let key = varint(msg, &mut at)?;
        let (number, wire) = (key >> 3, key & 7);
        // The field read must be length-delimited; any other wire type for it is a malformed
        // message (prost refuses it the same way), not an absent field.
        if number == 0 || (number == u64::from(field) && wire != 2) {
            return None;
        }
        match wire {
            0 => {
                varint(msg, &mut at)?;
            }
            1 => at = at.checked_add(8).filter(|&e| e <= msg.len())?,
            5 => at = at.checked_add(4).filter(|&e| e <= msg.len())?,
            2 => {
                let len = usize::try_from(varint(msg, &mut at)?).ok()?;
                let end = at.checked_add(len).filter(|&e| e <= msg.len())?;
                if number == u64::from(field) {
                    found = Some(&msg[at..end]);
                }
                at = end;
            }
            _ => return None,
        }
    }
    match found {
        Some(bytes) => std::str::from_utf8(bytes).ok().map(str::to_string),
        None => Some(String::new()),
    }
}

/// The message in one uncompressed gRPC frame (`flag, u32 length, message`), or None.
pub fn single_frame(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let msg = &rest[4..];
    (msg.len() == len).then_some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_what_the_issue_asks() {
        let lic = |m: &str| format!("{LIC}{m}");
        for role in Role::ALL {
            let only = |path: &str, who: Role| {
                assert_eq!(decide(path, role) == Decision::Allow, role == who, "{path} for {role}");
            };
            only(&lic("PublishWave"), Role::ImportAuthority);
            only(&lic("CreateWave"), Role::ImportAuthority);
            only(&lic("SetImportPolicy"), Role::Customs);
            only(&lic("GrantExportAuthorization"), Role::ExportAuthority);
            only(&format!("{INV}ReceiveSupply"), Role::Vendor);
            only(&lic("BatchReserveQuota"), Role::Service);
            only(&format!("{INV}BatchReserve"), Role::Service);
            only(&format!("{ORD}SetAllocationPolicy"), Role::Vendor);
        }
        assert_eq!(decide(&format!("{ORD}PlaceOrder"), Role::Buyer), Decision::CheckField(2));
        assert_eq!(decide(&format!("{ORD}CancelOrder"), Role::Buyer), Decision::AllowOwned);
        assert_eq!(decide(&format!("{ORD}GetOrder"), Role::Auditor), Decision::Allow);
        assert_eq!(decide(&format!("{ORD}PlaceOrder"), Role::Service), Decision::Deny);
        assert_eq!(decide("/chipgate.orders.v1.OrderService/NoSuchThing", Role::ImportAuthority), Decision::Deny);
    }

    #[test]
    fn the_auditor_only_reads() {
        for (svc, method, rule) in TABLE {
            let reads = ["Get", "List", "Check", "Verify", "Watch"].iter().any(|p| method.starts_with(p));
            if rule.roles.contains(&Role::Auditor) {
                assert!(reads, "the auditor may call {svc}{method}, which is not a read");
            }
        }
    }

    #[test]
    fn string_fields_are_read_from_the_wire() {
        // field 1 = "x", field 2 = "bytedance", field 4 = varint 7.
        let mut msg = vec![0x0a, 1, b'x', 0x12, 9];
        msg.extend_from_slice(b"bytedance");
        msg.extend_from_slice(&[0x20, 7]);
        assert_eq!(string_field(&msg, 2).as_deref(), Some("bytedance"));
        assert_eq!(string_field(&msg, 1).as_deref(), Some("x"));
        assert_eq!(string_field(&msg, 3).as_deref(), Some(""));
        assert_eq!(string_field(&[0x12, 200], 2), None, "truncated");
        assert_eq!(string_field(&[0x0b], 1), None, "group wire types are refused");
        assert_eq!(string_field(&[0x15, 1, 2, 3, 4], 2), None, "the field read with a non-string wire type");
        assert_eq!(string_field(&[0x15, 1, 2, 3, 4], 3).as_deref(), Some(""), "another field's wire type is skipped");
        let mut frame = vec![0, 0, 0, 0, msg.len() as u8];
        frame.extend_from_slice(&msg);
        assert_eq!(single_frame(&frame), Some(&msg[..]));
        frame[0] = 1;
        assert_eq!(single_frame(&frame), None, "compressed frames are not read");
    }
}
