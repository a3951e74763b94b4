//! Input validation shared by every service: ids, SKUs, free text, countries, request ids.
//! Each check records a field violation instead of failing fast, so one answer lists every problem.

use crate::errors::Violations;

/// Longest id, SKU or request id accepted.
pub const MAX_ID_LEN: usize = chipgate_domain::ids::MAX_ID_LEN;
/// Longest free text accepted (end use, reasons, justifications).
pub const MAX_TEXT_LEN: usize = 2000;

/// An identifier: 1-128 characters of letters, digits and `- _ . : /` (the rule of
/// [`chipgate_domain::ids`]).
pub fn id(v: &mut Violations, field: &str, value: &str) {
    if let Err(e) = chipgate_domain::ids::check(value) {
        v.add(field, e.to_string());
    }
}

/// A typed id (a [`chipgate_domain::ids`] type) parsed from a request field: `None`, with the
/// field's violation recorded, when it breaks an id rule.
pub fn parse<T: TryFrom<String, Error = chipgate_domain::ids::IdError>>(
    v: &mut Violations,
    field: &str,
    value: String,
) -> Option<T> {
    match T::try_from(value) {
        Ok(id) => Some(id),
        Err(e) => {
            v.add(field, e.to_string());
            None
        }
    }
}

/// An optional typed id: `Some(None)` when empty, `Some(Some(id))` when valid as [`parse`], `None`
/// (the violation recorded) otherwise.
pub fn parse_optional<T: TryFrom<String, Error = chipgate_domain::ids::IdError>>(
    v: &mut Violations,
    field: &str,
    value: String,
) -> Option<Option<T>> {
    if value.is_empty() {
        return Some(None);
    }
    parse(v, field, value).map(Some)
}

/// An optional identifier: empty, or valid as [`id`].
pub fn optional_id(v: &mut Violations, field: &str, value: &str) {
    if !value.is_empty() {
        id(v, field, value);
    }
}

/// Ids parsed from a request's fields ([`parse`]): an `Option` or a tuple of them.
pub trait Parsed {
    /// The ids, once every one parsed.
    type Value;
    /// The ids, or None when one didn't parse.
    fn all(self) -> Option<Self::Value>;
}

impl<A> Parsed for Option<A> {
    type Value = A;
    fn all(self) -> Option<A> {
        self
    }
}

macro_rules! parsed_tuple {
    ($($t:ident),+) => {
        impl<$($t),+> Parsed for ($(Option<$t>,)+) {
            type Value = ($($t,)+);
            #[allow(non_snake_case)]
            fn all(self) -> Option<Self::Value> {
                let ($($t,)+) = self;
                Some(($($t?,)+))
            }
        }
    };
}
parsed_tuple!(A, B);
parsed_tuple!(A, B, C);
parsed_tuple!(A, B, C, D);

/// The parsed ids when the request has no violations at all, else every violation (a field that
/// didn't parse recorded one, so the answer names every bad field at once).
///
/// # Errors
/// The violations.
pub fn finish<P: Parsed>(v: Violations, parsed: P) -> Result<P::Value, Violations> {
    match parsed.all() {
        Some(value) if v.is_empty() => Ok(value),
        _ => Err(v),
    }
}

/// [`finish`], answering INVALID_ARGUMENT with every violation.
///
/// # Errors
/// The INVALID_ARGUMENT status.
pub fn finish_status<P: Parsed>(v: Violations, parsed: P) -> Result<P::Value, tonic::Status> {
    finish(v, parsed).map_err(Violations::into_status)
}

/// The request id every mutating call carries.
pub fn request_id(v: &mut Violations, value: &str) {
    if value.is_empty() {
        v.add("request_id", "is required: every mutating call carries an idempotency key (1-128 characters)");
    } else if value.len() > MAX_ID_LEN {
        v.add("request_id", format!("is {} characters long; at most {MAX_ID_LEN} are allowed", value.len()));
    } else if !value.chars().all(|c| c.is_ascii_graphic()) {
        v.add("request_id", "may contain only visible ASCII characters");
    }
}

/// Free text up to `max` characters; `required` rejects empty text.
pub fn text(v: &mut Violations, field: &str, value: &str, max: usize, required: bool) {
    if required && value.trim().is_empty() {
        v.add(field, "is required");
    } else if value.chars().count() > max {
        v.add(field, format!("is longer than {max} characters"));
    } else if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        v.add(field, "may not contain control characters");
    }
}

/// A positive amount of units, at most `max`.
pub fn units(v: &mut Violations, field: &str, value: u64, max: u64) {
    if value == 0 {
        v.add(field, "must be at least 1");
    } else if value > max {
        v.add(field, format!("must be at most {max}"));
    }
}

/// An ISO 3166-1 alpha-2 country code.
pub fn country(v: &mut Violations, field: &str, value: &str) {
    if value.len() != 2 || !value.chars().all(|c| c.is_ascii_uppercase()) {
        v.add(field, "must be an ISO 3166-1 alpha-2 code such as CN");
    }
}

/// The `items` of a batch call naming orders: 1 to `max` of them. Returns how many to check one by
/// one (at most `max`, so an oversized batch costs no more than a full one).
pub fn batch(v: &mut Violations, len: usize, max: usize) -> usize {
    if len == 0 {
        v.add("items", "must hold at least one order");
    }
    if len > max {
        v.add("items", format!("holds {len} orders; at most {max} per call"));
    }
    len.min(max)
}

/// An order and its allocation generation, as a batch item names them (`prefix` is `items[i].`).
pub fn order_ref(v: &mut Violations, prefix: &str, order_id: &str, generation: u64) {
    parse_order_ref(v, prefix, order_id, generation);
}

/// [`order_ref`], returning the order's id when it parses.
pub fn parse_order_ref(
    v: &mut Violations,
    prefix: &str,
    order_id: &str,
    generation: u64,
) -> Option<chipgate_domain::ids::OrderId> {
    let id = parse(v, &format!("{prefix}order_id"), order_id.to_string());
    if generation == 0 {
        v.add(format!("{prefix}generation"), "must be at least 1");
    }
    id
}

/// An order named at most once per batch: `seen` holds the keys of the items before it.
pub fn once<K: std::hash::Hash + Eq>(
    v: &mut Violations,
    seen: &mut std::collections::HashSet<K>,
    key: K,
    prefix: &str,
    order_id: &str,
) {
    if !seen.insert(key) {
        v.add(format!("{prefix}order_id"), format!("order {order_id} appears twice in the batch"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_name_each_order_once() {
        let mut v = Violations::new();
        assert_eq!(batch(&mut v, 0, 3), 0);
        assert_eq!(batch(&mut v, 5, 3), 3);
        assert_eq!(batch(&mut v, 2, 3), 2);
        let mut seen = std::collections::HashSet::new();
        for (i, (o, g)) in [("o1", 1), ("", 0), ("o1", 2)].into_iter().enumerate() {
            let prefix = format!("items[{i}].");
            order_ref(&mut v, &prefix, o, g);
            once(&mut v, &mut seen, o, &prefix, o);
        }
        let fields: Vec<&str> = v.list().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["items", "items", "items[1].order_id", "items[1].generation", "items[2].order_id"]);
        assert!(v.list()[4].description.contains("order o1 appears twice"));
    }

    #[test]
    fn ids_are_checked() {
        let mut v = Violations::new();
        id(&mut v, "a", "ok-1_2.3");
        id(&mut v, "b", "");
        id(&mut v, "c", &"x".repeat(129));
        id(&mut v, "d", "white space");
        optional_id(&mut v, "e", "");
        let fields: Vec<&str> = v.list().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["b", "c", "d"]);
    }

    #[test]
    fn typed_ids_parse_and_finish_with_every_violation() {
        use chipgate_domain::ids::{BuyerId, Sku};
        let mut v = Violations::new();
        let sku = parse::<Sku>(&mut v, "product_sku", "H200".into());
        let buyer = parse::<BuyerId>(&mut v, "buyer_id", "acme".into());
        let none = parse_optional::<BuyerId>(&mut v, "other", String::new());
        let parsed = finish(v, (sku, buyer, none));
        assert!(matches!(parsed, Ok((s, b, None)) if s == "H200" && b == "acme"));

        let mut v = Violations::new();
        let sku = parse::<Sku>(&mut v, "product_sku", String::new());
        let buyer = parse::<BuyerId>(&mut v, "buyer_id", "white space".into());
        let ok = parse::<BuyerId>(&mut v, "third", "fine".into());
        let Err(v) = finish(v, (sku, buyer, ok)) else { panic!("bad ids passed") };
        let fields: Vec<(&str, &str)> = v.list().iter().map(|f| (f.field.as_str(), f.description.as_str())).collect();
        assert_eq!(
            fields,
            [("product_sku", "is required"), ("buyer_id", "may contain only letters, digits and - _ . : /")]
        );
    }

    #[test]
    fn units_text_and_countries() {
        let mut v = Violations::new();
        units(&mut v, "u0", 0, 10);
        units(&mut v, "u1", 11, 10);
        units(&mut v, "u2", 10, 10);
        text(&mut v, "t0", "", 10, true);
        text(&mut v, "t1", "hello\u{7}", 10, false);
        text(&mut v, "t2", "fine", 10, true);
        country(&mut v, "c0", "CN");
        country(&mut v, "c1", "cn");
        request_id(&mut v, "");
        let fields: Vec<&str> = v.list().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["u0", "u1", "t0", "t1", "c1", "request_id"]);
    }
}
