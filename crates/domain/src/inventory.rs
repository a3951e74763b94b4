//! Inventory rules: stock arithmetic and the hold state machine.
//!
//! Stock of a product always adds up: `received = available + held + committed + shipped`, and
//! `on_hand = available + held + committed`. Units move only along these edges:
//! receive → available; available ⇄ held (hold, release, expire); held → committed (confirm);
//! committed → available (release before shipping); committed → shipped (ship).
//!
//! A hold belongs to one order at one *generation*. It may be partial (fewer units held than
//! requested) while the order waits in a backlog; it expires only once complete and unconfirmed past
//! its expiry. A released or expired generation is never reopened; a higher generation supersedes
//! (and gives back) whatever an older one still holds.

/// What kind of part a product is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ProductClass {
    /// Never stored.
    Unspecified = 0,
    /// Export-controlled accelerator.
    ExportControlledAccelerator = 1,
    /// Domestic accelerator.
    DomesticAccelerator = 2,
}

/// A catalogue product.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProductRecord {
    /// SKU.
    #[prost(string, tag = "1")]
    pub sku: String,
    /// Name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// [`ProductClass`].
    #[prost(enumeration = "ProductClass", tag = "3")]
    pub class: i32,
    /// Performance relative to the H20.
    #[prost(double, tag = "4")]
    pub relative_performance: f64,
    /// Vendor.
    #[prost(string, tag = "5")]
    pub vendor: String,
    /// Last change.
    #[prost(uint64, tag = "6")]
    pub update_ms: u64,
}

/// The stock of one product.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct StockRecord {
    /// Product.
    #[prost(string, tag = "1")]
    pub sku: String,
    /// Free to hold.
    #[prost(uint64, tag = "2")]
    pub available: u64,
    /// Held by unconfirmed holds.
    #[prost(uint64, tag = "3")]
    pub held: u64,
    /// Confirmed, not shipped.
    #[prost(uint64, tag = "4")]
    pub committed: u64,
    /// Shipped.
    #[prost(uint64, tag = "5")]
    pub shipped: u64,
    /// Received over all time.
    #[prost(uint64, tag = "6")]
    pub received: u64,
    /// Last change.
    #[prost(uint64, tag = "7")]
    pub update_ms: u64,
}

/// A move the stock can't make (a bug elsewhere if it ever happens: callers check first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StockError {
    /// The move.
    pub action: &'static str,
    /// Units asked for.
    pub units: u64,
    /// Units there were.
    pub there: u64,
}

impl std::fmt::Display for StockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "can't {} {} units: only {} there", self.action, self.units, self.there)
    }
}

impl std::error::Error for StockError {}

fn take(from: &mut u64, units: u64, action: &'static str) -> Result<(), StockError> {
    if *from < units {
        return Err(StockError { action, units, there: *from });
    }
    *from -= units;
    Ok(())
}

impl StockRecord {
    /// Empty stock of a product.
    pub fn empty(sku: &str) -> Self {
        StockRecord { sku: sku.to_string(), ..Default::default() }
    }

    /// Units physically present.
    pub fn on_hand(&self) -> u64 {
        self.available + self.held + self.committed
    }

    /// The invariant: everything received is somewhere.
    pub fn adds_up(&self) -> bool {
        self.received == self.available + self.held + self.committed + self.shipped
    }

    /// Books received units.
    pub fn receive(&mut self, units: u64) {
        self.received += units;
        self.available += units;
    }

    /// Holds up to `units` from available; returns how many were held.
    pub fn hold_up_to(&mut self, units: u64) -> u64 {
        let n = units.min(self.available);
        self.available -= n;
        self.held += n;
        n
    }

    /// Gives held units back to available.
    ///
    /// # Errors
    /// When fewer units are held.
    pub fn release_held(&mut self, units: u64) -> Result<(), StockError> {
        take(&mut self.held, units, "release held")?;
        self.available += units;
        Ok(())
    }

    /// Moves held units to committed.
    ///
    /// # Errors
    /// When fewer units are held.
    pub fn commit(&mut self, units: u64) -> Result<(), StockError> {
        take(&mut self.held, units, "commit")?;
        self.committed += units;
        Ok(())
    }

    /// Gives committed units back to available.
    ///
    /// # Errors
    /// When fewer units are committed.
    pub fn release_committed(&mut self, units: u64) -> Result<(), StockError> {
        take(&mut self.committed, units, "release committed")?;
        self.available += units;
        Ok(())
    }

    /// Ships committed units.
    ///
    /// # Errors
    /// When fewer units are committed.
    pub fn ship(&mut self, units: u64) -> Result<(), StockError> {
        take(&mut self.committed, units, "ship")?;
        self.shipped += units;
        Ok(())
    }
}

/// Where a hold stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum HoldStatus {
    /// Never stored.
    Unspecified = 0,
    /// Units held (possibly fewer than requested).
    Held = 1,
    /// Confirmed: units committed.
    Confirmed = 2,
    /// Shipped.
    Shipped = 3,
    /// Given back on request (or a tombstone fencing off a late reserve).
    Released = 4,
    /// Given back because it was not confirmed in time.
    Expired = 5,
}

/// An order's hold on stock, for its current generation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HoldRecord {
    /// Order.
    #[prost(string, tag = "1")]
    pub order_id: String,
    /// Generation.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    /// Product.
    #[prost(string, tag = "3")]
    pub sku: String,
    /// Units the order wants.
    #[prost(uint64, tag = "4")]
    pub requested: u64,
    /// Units held, committed or shipped.
    #[prost(uint64, tag = "5")]
    pub held: u64,
    /// [`HoldStatus`].
    #[prost(enumeration = "HoldStatus", tag = "6")]
    pub status: i32,
    /// Hold time once complete.
    #[prost(uint32, tag = "7")]
    pub hold_seconds: u32,
    /// Expiry (ms since epoch) once complete; 0 while partial.
    #[prost(uint64, tag = "8")]
    pub expire_ms: u64,
    /// Created.
    #[prost(uint64, tag = "9")]
    pub create_ms: u64,
    /// Last change.
    #[prost(uint64, tag = "10")]
    pub update_ms: u64,
    /// Why released.
    #[prost(string, tag = "11")]
    pub release_reason: String,
}

/// How a hold request fares against an existing hold of the same order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldCheck {
    /// No hold yet (or only an older, finished generation): open a new one.
    Open,
    /// An older generation still holds `held` units (committed when `confirmed`): give them back,
    /// then open a new one.
    Supersede {
        /// Units to give back.
        held: u64,
        /// They were committed rather than held.
        confirmed: bool,
    },
    /// The same generation is open and partial: top it up.
    TopUp,
    /// The same generation is complete (or confirmed, or shipped): nothing to do.
    Done,
    /// Released or expired at this generation, or a newer generation exists.
    Stale,
    /// The same generation was asked for a different number of units.
    Mismatch {
        /// Units of the existing hold.
        requested: u64,
    },
}

/// What a hold's stored form adds to [`HoldRecord`]'s own fields (12), read from the same bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredHold {
    /// The compact form: the order and the product are the key's (left out), and `update_ms` is
    /// stored as the milliseconds since `create_ms`.
    #[prost(bool, tag = "12")]
    compact: bool,
    /// In the compact form, the expiry as milliseconds since `create_ms` (none: no expiry, 0).
    #[prost(sint64, optional, tag = "13")]
    expire_after_ms: Option<i64>,
}

impl HoldRecord {
    /// The bytes Redis keeps for this hold, under the key that names its product and order
    /// (inventory's `keys::hold(sku, order_id)`), so neither is repeated in the value, and the
    /// last-change and expiry times are counted from the creation time. [`from_stored`](Self::from_stored), given the key's
    /// product and order, reads them back to an equal record.
    ///
    /// Why: the order id and product were ~40 of a hold's ~70 bytes; without them the value fits
    /// Redis' embedded strings (one allocation of 48 bytes instead of two of 16 and 80).
    pub fn to_stored(&self) -> Vec<u8> {
        let head = HoldRecord {
            order_id: String::new(),
            sku: String::new(),
            update_ms: self.update_ms.wrapping_sub(self.create_ms),
            expire_ms: 0,
            ..self.clone()
        };
        let expire_after_ms = (self.expire_ms != 0).then(|| self.expire_ms.wrapping_sub(self.create_ms) as i64);
        let extra = StoredHold { compact: true, expire_after_ms };
        crate::encode_stored(&head, &extra)
    }

    /// Reads what [`to_stored`](Self::to_stored) wrote under the key of product `sku`'s order
    /// `order_id`, or a hold's plain encoding (the form before it, which holds both itself).
    ///
    /// # Errors
    /// When the bytes are not a hold.
    pub fn from_stored(bytes: &[u8], sku: &str, order_id: &str) -> Result<Self, prost::DecodeError> {
        use prost::Message;
        let mut h = HoldRecord::decode(bytes)?;
        let extra = StoredHold::decode(bytes)?;
        if extra.compact {
            h.order_id = order_id.to_string();
            h.sku = sku.to_string();
            h.update_ms = h.create_ms.wrapping_add(h.update_ms);
            h.expire_ms = extra.expire_after_ms.map_or(0, |after| h.create_ms.wrapping_add(after as u64));
        }
        Ok(h)
    }

    /// True once every requested unit is held.
    pub fn is_complete(&self) -> bool {
        self.held >= self.requested
    }

    /// Units this hold keeps out of available (held or committed).
    pub fn occupying(&self) -> (u64, bool) {
        match self.status() {
            HoldStatus::Held => (self.held, false),
            HoldStatus::Confirmed => (self.held, true),
            _ => (0, false),
        }
    }

    /// Decides what a hold of `units` at `generation` must do given this (existing) hold.
    pub fn check(&self, generation: u64, units: u64) -> HoldCheck {
        use std::cmp::Ordering::*;
        match generation.cmp(&self.generation) {
            Less => HoldCheck::Stale,
            Greater => match self.occupying() {
                (0, _) => HoldCheck::Open,
                (held, confirmed) => HoldCheck::Supersede { held, confirmed },
            },
            Equal => match self.status() {
                HoldStatus::Released | HoldStatus::Expired | HoldStatus::Unspecified => HoldCheck::Stale,
                _ if units != self.requested => HoldCheck::Mismatch { requested: self.requested },
                HoldStatus::Held if !self.is_complete() => HoldCheck::TopUp,
                HoldStatus::Held | HoldStatus::Confirmed | HoldStatus::Shipped => HoldCheck::Done,
            },
        }
    }

    /// Marks the hold complete at `now_ms`, starting its expiry clock.
    pub fn complete(&mut self, now_ms: u64) {
        self.expire_ms = now_ms + u64::from(self.hold_seconds) * 1000;
    }

    /// True when complete, unconfirmed and past expiry.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.status() == HoldStatus::Held && self.is_complete() && self.expire_ms != 0 && now_ms >= self.expire_ms
    }
}

/// How one item of a batch hold fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Every unit is held.
    Held,
    /// Some are; the order waits for the rest.
    Partial,
    /// Nothing new was held.
    NotServed,
    /// The generation is stale.
    Stale,
}

/// Serves a batch of hold requests for one product strictly in order: once an item is not fully
/// served, no later item takes anything (an order that may hold partially takes what there is first).
pub struct HoldPlanner {
    /// The running stock.
    pub stock: StockRecord,
    stopped: bool,
    now_ms: u64,
}

/// One request of a batch.
#[derive(Clone, Debug)]
pub struct HoldAsk {
    /// Order.
    pub order_id: crate::ids::OrderId,
    /// Generation.
    pub generation: u64,
    /// Units wanted in all.
    pub units: u64,
    /// May hold fewer.
    pub allow_partial: bool,
    /// Hold time once complete.
    pub hold_seconds: u32,
    /// Units of this generation the caller has recorded as held; more in an existing hold were taken by
    /// an attempt the caller never recorded, and [`HoldPlanner::reclaim`] gives them back. `None`: an
    /// existing hold is trusted as it is.
    pub known_held: Option<u64>,
    /// Hold at most this many units in all for now (the caller's planned share of the stock, see
    /// [`crate::shares`]): an item held up to it is served as asked, and later items are still served.
    /// `None`: up to `units`.
    pub max_units: Option<u64>,
}

impl HoldPlanner {
    /// A planner over the product's current stock.
    pub fn new(stock: StockRecord, now_ms: u64) -> Self {
        HoldPlanner { stock, stopped: false, now_ms }
    }

    /// Gives back the units of an existing hold of the ask's generation that the caller never recorded
    /// (beyond [`HoldAsk::known_held`]): a batch retried after its commit lost, or a round cut short after
    /// inventory answered, leaves such holds behind, and serving them as they stand would let a later
    /// order keep stock that an earlier one of the same batch is short of. Call it for every ask of a
    /// batch before [`HoldPlanner::plan`]ning any, so the batch is served afresh strictly in its order.
    /// Returns the trimmed hold (to plan against and store) when something went back.
    pub fn reclaim(&mut self, ask: &HoldAsk, existing: Option<&HoldRecord>) -> Option<HoldRecord> {
        let known = ask.known_held?;
        let h = existing?;
        let ours = h.generation == ask.generation && h.requested == ask.units && h.status() == HoldStatus::Held;
        if !ours || h.held <= known {
            return None;
        }
        let excess = h.held - known;
        // The units are counted as held in the stock (every hold's are): giving them back can't fail.
        self.stock.release_held(excess).ok()?;
        Some(HoldRecord { held: known, expire_ms: 0, update_ms: self.now_ms, ..h.clone() })
    }

    /// Decides one ask against the existing hold (if any). Returns the outcome and the hold to store
    /// (None when nothing changes).
    ///
    /// # Errors
    /// When the existing hold was asked with other units ([`HoldCheck::Mismatch`]).
    pub fn plan(
        &mut self,
        ask: &HoldAsk,
        existing: Option<&HoldRecord>,
    ) -> Result<(HoldOutcome, Option<HoldRecord>), u64> {
        let check = existing.map(|h| h.check(ask.generation, ask.units)).unwrap_or(HoldCheck::Open);
        let mut hold = match check {
            HoldCheck::Mismatch { requested } => return Err(requested),
            HoldCheck::Stale => {
                // The order goes back to be evaluated again and returns at its place in the backlog:
                // nobody behind it takes stock past it meanwhile.
                self.stopped = true;
                return Ok((HoldOutcome::Stale, None));
            }
            HoldCheck::Done => {
                let outcome = if existing.is_some_and(HoldRecord::is_complete) {
                    HoldOutcome::Held
                } else {
                    HoldOutcome::Partial
                };
                return Ok((outcome, None));
            }
            HoldCheck::TopUp => existing.cloned().unwrap_or_default(),
            HoldCheck::Open | HoldCheck::Supersede { .. } => {
                if let HoldCheck::Supersede { held, confirmed } = check {
                    // Giving back an older generation's units can't fail: they are counted in stock.
                    let _ = if confirmed { self.stock.release_committed(held) } else { self.stock.release_held(held) };
                }
                HoldRecord {
                    order_id: ask.order_id.to_string(),
                    generation: ask.generation,
                    sku: self.stock.sku.clone(),
                    requested: ask.units,
                    held: 0,
                    status: HoldStatus::Held as i32,
                    hold_seconds: ask.hold_seconds,
                    expire_ms: 0,
                    create_ms: self.now_ms,
                    update_ms: self.now_ms,
                    release_reason: String::new(),
                }
            }
        };
        let superseded = matches!(check, HoldCheck::Supersede { .. });
        // What the caller asks for now: everything, or up to its planned share.
        let target = ask.max_units.map_or(hold.requested, |m| m.min(hold.requested));
        let need = target.saturating_sub(hold.held);
        let can = if self.stopped { 0 } else { need.min(self.stock.available) };
        let take = if can == need || ask.allow_partial { can } else { 0 };
        if take < need {
            self.stopped = true;
        }
        if take == 0 && !(check == HoldCheck::Open || superseded) {
            // A partial hold that gets nothing more: unchanged.
            return Ok((HoldOutcome::NotServed, None));
        }
        if take == 0 && !ask.allow_partial {
            // Nothing held and partial holds not wanted: don't create an empty hold (but a superseded
            // generation must still record that its units went back).
            return Ok((
                HoldOutcome::NotServed,
                superseded.then_some(HoldRecord { status: HoldStatus::Released as i32, ..hold }),
            ));
        }
        self.stock.hold_up_to(take);
        hold.held += take;
        hold.update_ms = self.now_ms;
        let outcome = if hold.is_complete() {
            hold.complete(self.now_ms);
            HoldOutcome::Held
        } else if take > 0 || hold.held > 0 {
            HoldOutcome::Partial
        } else {
            HoldOutcome::NotServed
        };
        Ok((outcome, Some(hold)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_hold_reads_back_without_what_its_key_says() {
        use prost::Message;
        let (sku, order) = ("H200-SXM-141GB", "ord-H200-SXM-141GB-49999");
        let t = 1_764_000_000_000;
        let h = HoldRecord {
            order_id: order.into(),
            generation: 1,
            sku: sku.into(),
            requested: 10,
            held: 10,
            status: HoldStatus::Held as i32,
            hold_seconds: 900,
            expire_ms: t + 900_000,
            create_ms: t,
            update_ms: t + 40,
            release_reason: String::new(),
        };
        let stored = h.to_stored();
        assert_eq!(HoldRecord::from_stored(&stored, sku, order).unwrap(), h);
        for repeated in [order, sku] {
            assert!(!stored.windows(repeated.len()).any(|w| w == repeated.as_bytes()), "{repeated} is stored");
        }
        // With its "N:" version prefix, one 48-byte allocation (Redis' embedded string: 16 + 3 + len + 1,
        // so len <= 28).
        assert!(stored.len() + 2 <= 28, "{} bytes", stored.len());
        // Released, with a reason and a clock behind the creation's; a tombstone; an expiry at creation.
        let released = HoldRecord {
            status: HoldStatus::Released as i32,
            update_ms: t - 3,
            release_reason: "order cancelled".into(),
            ..h.clone()
        };
        let tombstone = HoldRecord { requested: 0, held: 0, expire_ms: 0, ..released.clone() };
        let at_once = HoldRecord { expire_ms: t, ..h.clone() };
        let before = HoldRecord { expire_ms: t - 1, ..h.clone() };
        for x in [released, tombstone, at_once, before] {
            assert_eq!(HoldRecord::from_stored(&x.to_stored(), sku, order).unwrap(), x);
        }
        // Holds stored before the compact form read as they were (their own order and product).
        assert_eq!(HoldRecord::from_stored(&h.encode_to_vec(), "other", "ord-other-1").unwrap(), h);
        assert!(HoldRecord::from_stored(b"\xff\xff", sku, order).is_err());
    }

    const NOW: u64 = 1_800_000_000_000;

    fn stock(available: u64) -> StockRecord {
        StockRecord { sku: "H200".into(), available, received: available, ..Default::default() }
    }

    fn ask(order: &str, units: u64, partial: bool) -> HoldAsk {
        HoldAsk {
            order_id: crate::ids::OrderId::from_trusted(order),
            generation: 1,
            units,
            allow_partial: partial,
            hold_seconds: 60,
            known_held: None,
            max_units: None,
        }
    }

    /// A batch retried after its commit was lost (or a round cut short) finds holds it never recorded:
    /// they go back first, and the batch is served in its order as if they had never been taken.
    #[test]
    fn unrecorded_holds_go_back_before_a_batch_is_served_in_order() {
        // b took 80 units in an attempt whose outcome was lost; 10 units are free now.
        let orphan = HoldRecord {
            order_id: "b".into(),
            generation: 1,
            sku: "H200".into(),
            requested: 80,
            held: 80,
            status: HoldStatus::Held as i32,
            expire_ms: NOW + 60_000,
            ..Default::default()
        };
        let mut s = stock(90);
        s.hold_up_to(80);
        let asks = [
            HoldAsk { known_held: Some(0), ..ask("a", 90, true) },
            HoldAsk { known_held: Some(0), ..ask("b", 80, true) },
        ];
        let existing = [None, Some(&orphan)];

        // Trusted as it stands, the orphan lets b overtake a.
        let mut trusting = HoldPlanner::new(s.clone(), NOW);
        let (a, _) = trusting.plan(&HoldAsk { known_held: None, ..asks[0].clone() }, None).expect("ok");
        let (b, _) = trusting.plan(&HoldAsk { known_held: None, ..asks[1].clone() }, Some(&orphan)).expect("ok");
        assert_eq!((a, b), (HoldOutcome::Partial, HoldOutcome::Held), "the failure this guards against");

        let mut p = HoldPlanner::new(s, NOW);
        let trimmed: Vec<Option<HoldRecord>> = asks.iter().zip(existing).map(|(k, e)| p.reclaim(k, e)).collect();
        assert!(trimmed[0].is_none());
        assert_eq!(trimmed[1].as_ref().map(|h| (h.held, h.expire_ms)), Some((0, 0)));
        assert_eq!((p.stock.available, p.stock.held), (90, 0));
        let (a, ha) = p.plan(&asks[0], None).expect("ok");
        let (b, hb) = p.plan(&asks[1], trimmed[1].as_ref()).expect("ok");
        assert_eq!((a, ha.map(|h| h.held)), (HoldOutcome::Held, Some(90)));
        assert_eq!((b, hb.map(|h| h.held)), (HoldOutcome::NotServed, None), "b waits behind a");
        assert_eq!((p.stock.available, p.stock.held), (0, 90));
        assert!(p.stock.adds_up());

        // What the caller recorded stays: a known partial hold is kept, only the excess goes back.
        let mut s = stock(50);
        s.hold_up_to(50);
        let partial = HoldRecord { held: 50, expire_ms: 0, requested: 80, ..orphan.clone() };
        let mut p = HoldPlanner::new(s, NOW);
        let k = HoldAsk { known_held: Some(30), ..ask("b", 80, true) };
        assert_eq!(p.reclaim(&k, Some(&partial)).map(|h| h.held), Some(30));
        assert_eq!((p.stock.available, p.stock.held), (20, 30));
        // Another generation, a confirmed hold or nothing beyond what is known: untouched.
        let k = HoldAsk { known_held: Some(50), ..ask("b", 80, true) };
        assert!(p.reclaim(&k, Some(&partial)).is_none());
        assert!(p.reclaim(&HoldAsk { generation: 2, ..k.clone() }, Some(&partial)).is_none());
        let confirmed = HoldRecord { status: HoldStatus::Confirmed as i32, ..orphan };
        assert!(p.reclaim(&HoldAsk { known_held: Some(0), ..k }, Some(&confirmed)).is_none());
    }

    #[test]
    fn stock_moves_keep_the_books_balanced() {
        let mut s = stock(0);
        s.receive(100);
        assert_eq!(s.hold_up_to(150), 100);
        s.release_held(30).expect("held");
        s.commit(50).expect("held");
        s.release_committed(10).expect("committed");
        s.ship(40).expect("committed");
        assert_eq!((s.available, s.held, s.committed, s.shipped, s.received), (40, 20, 0, 40, 100));
        assert_eq!(s.on_hand(), 60);
        assert!(s.adds_up());
        let err = s.ship(1).expect_err("nothing committed");
        assert_eq!(err.to_string(), "can't ship 1 units: only 0 there");
        assert!(s.adds_up(), "a refused move changes nothing");
    }

    #[test]
    fn batch_is_served_in_order_and_stops_at_the_first_short_item() {
        let mut p = HoldPlanner::new(stock(100), NOW);
        let (o, h) = p.plan(&ask("a", 60, false), None).expect("ok");
        assert_eq!((o, h.as_ref().map(|h| h.held)), (HoldOutcome::Held, Some(60)));
        assert_eq!(h.expect("hold").expire_ms, NOW + 60_000, "complete holds start their expiry clock");
        // b wants 50 but 40 are left and it may not hold partially: nothing, and the batch stops.
        let (o, h) = p.plan(&ask("b", 50, false), None).expect("ok");
        assert_eq!((o, h), (HoldOutcome::NotServed, None));
        // c would fit, but may not overtake b.
        let (o, h) = p.plan(&ask("c", 10, false), None).expect("ok");
        assert_eq!((o, h), (HoldOutcome::NotServed, None));
        assert_eq!(p.stock.available, 40);
    }

    /// A planned share (`max_units`) is served as asked: the batch goes on past an order held up to its
    /// share, and stops only at one short of it.
    #[test]
    fn planned_shares_are_served_without_stopping_the_batch() {
        let capped = |order: &str, units: u64, max: u64| HoldAsk { max_units: Some(max), ..ask(order, units, true) };
        let mut p = HoldPlanner::new(stock(100), NOW);
        let (o, a) = p.plan(&capped("a", 50, 30), None).expect("ok");
        assert_eq!((o, a.as_ref().map(|h| (h.held, h.expire_ms))), (HoldOutcome::Partial, Some((30, 0))));
        let (o, b) = p.plan(&capped("b", 40, 20), None).expect("ok");
        assert_eq!((o, b.map(|h| h.held)), (HoldOutcome::Partial, Some(20)));
        let (o, c) = p.plan(&ask("c", 10, true), None).expect("ok");
        assert_eq!((o, c.map(|h| h.held)), (HoldOutcome::Held, Some(10)), "c is served after a and b's shares");
        assert_eq!(p.stock.available, 40);
        // Topping a up to a share it already has takes nothing; a share beyond it takes the difference.
        let a = a.expect("hold");
        let (o, none) = p.plan(&capped("a", 50, 30), Some(&a)).expect("ok");
        assert_eq!((o, none), (HoldOutcome::NotServed, None));
        let (o, a2) = p.plan(&capped("a", 50, 50), Some(&a)).expect("ok");
        assert_eq!((o, a2.map(|h| h.held)), (HoldOutcome::Held, Some(50)));
        assert_eq!(p.stock.available, 20);
        // Short of its share: the batch stops there.
        let mut p = HoldPlanner::new(stock(25), NOW);
        let (o, _) = p.plan(&capped("a", 50, 30), None).expect("ok");
        assert_eq!(o, HoldOutcome::Partial);
        let (o, _) = p.plan(&capped("b", 40, 1), None).expect("ok");
        assert_eq!(o, HoldOutcome::NotServed, "b may not overtake a, which is short of its share");
        assert!(p.stock.adds_up());
    }

    #[test]
    fn partial_holds_take_what_there_is_and_wait_without_expiring() {
        let mut p = HoldPlanner::new(stock(30), NOW);
        let (o, h) = p.plan(&ask("a", 50, true), None).expect("ok");
        let h = h.expect("hold");
        assert_eq!((o, h.held, h.expire_ms), (HoldOutcome::Partial, 30, 0));
        assert!(!h.is_expired(NOW + 10_000_000));
        let (o, _) = p.plan(&ask("b", 1, true), None).expect("ok");
        assert_eq!(o, HoldOutcome::NotServed, "later orders get nothing while a is short");

        // Supply arrives: a tops up and completes.
        let mut s = p.stock.clone();
        s.receive(25);
        let mut p = HoldPlanner::new(s, NOW + 5);
        let (o, h2) = p.plan(&ask("a", 50, true), Some(&h)).expect("ok");
        let h2 = h2.expect("topped up");
        assert_eq!((o, h2.held, h2.expire_ms), (HoldOutcome::Held, 50, NOW + 5 + 60_000));
        assert_eq!(p.stock.available, 5);
        assert!(p.stock.adds_up());
        // Asking again changes nothing.
        let (o, none) = p.plan(&ask("a", 50, true), Some(&h2)).expect("ok");
        assert_eq!((o, none), (HoldOutcome::Held, None));
    }

    #[test]
    fn generations_fence_and_supersede() {
        let h = HoldRecord {
            order_id: "a".into(),
            generation: 2,
            sku: "H200".into(),
            requested: 10,
            held: 10,
            status: HoldStatus::Held as i32,
            ..Default::default()
        };
        assert_eq!(h.check(1, 10), HoldCheck::Stale);
        assert_eq!(h.check(2, 10), HoldCheck::Done);
        assert_eq!(h.check(2, 11), HoldCheck::Mismatch { requested: 10 });
        assert_eq!(h.check(3, 5), HoldCheck::Supersede { held: 10, confirmed: false });
        let released = HoldRecord { status: HoldStatus::Released as i32, ..h.clone() };
        assert_eq!(released.check(2, 10), HoldCheck::Stale);
        assert_eq!(released.check(2, 99), HoldCheck::Stale, "a released generation is stale whatever the units");
        assert_eq!(released.check(3, 10), HoldCheck::Open);

        // Superseding gives the old units back before taking new ones.
        let mut s = stock(0);
        s.receive(10);
        s.hold_up_to(10);
        let mut p = HoldPlanner::new(s, NOW);
        let (o, new) = p.plan(&HoldAsk { generation: 3, ..ask("a", 4, false) }, Some(&h)).expect("ok");
        assert_eq!((o, new.expect("hold").held), (HoldOutcome::Held, 4));
        assert_eq!((p.stock.available, p.stock.held), (6, 4));
        assert!(p.stock.adds_up());

        // A stale order goes back to be evaluated and returns to its place: nobody behind it in the
        // batch takes stock meanwhile.
        let mut p = HoldPlanner::new(stock(50), NOW);
        let (o, _) = p.plan(&ask("a", 5, true), Some(&released)).expect("ok");
        assert_eq!(o, HoldOutcome::Stale);
        let (o, hold) = p.plan(&ask("b", 5, true), None).expect("ok");
        assert_eq!(o, HoldOutcome::NotServed, "b may not overtake the stale a");
        assert_eq!(hold.map(|h| h.held), Some(0), "b waits with an empty (partial) hold");
        assert_eq!(p.stock.available, 50);
    }

    #[test]
    fn expiry_only_applies_to_complete_unconfirmed_holds() {
        let mut h = HoldRecord {
            requested: 5,
            held: 5,
            status: HoldStatus::Held as i32,
            hold_seconds: 1,
            ..Default::default()
        };
        h.complete(NOW);
        assert!(!h.is_expired(NOW + 999));
        assert!(h.is_expired(NOW + 1000));
        h.status = HoldStatus::Confirmed as i32;
        assert!(!h.is_expired(NOW + 5000));
    }
}
