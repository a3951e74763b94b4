//! Typed ids: a buyer, a product (its SKU), an order, a licence, an application, a wave.
//!
//! Every id is text on the wire and in Redis, and a key-building function that took two `&str` (a
//! product and a buyer, say) accepted them in either order. Each kind of id is its own type here, so
//! passing a buyer where a product belongs is a compile error. An id is parsed once, where it enters
//! (a request's fields, at the edge), with the rules every id has always had: 1 to [`MAX_ID_LEN`]
//! characters of letters, digits and `- _ . : /`. What the services read back from their own
//! records was checked when it entered; [`Sku::from_trusted`] and its siblings wrap such a value
//! without checking it again (and without panicking on a value that would fail: a record's bytes
//! are data, never a reason to crash).
//!
//! The structure some ids carry (an order id `ord-<SKU>-<n>`, a licence id `lic-<SKU>-<n>`, both
//! naming the product whose partition holds them) is read with [`OrderId::product`] and
//! [`LicenceId::product`]: an id of the right characters that names no product is a well-formed id
//! of nothing that exists (the caller is told NOT_FOUND, as ever), not a malformed one.
//!
//! Reading an id as text is always fine (`Deref<Target = str>`, `as_str`, `Display`); turning text
//! into an id takes a parse.

use std::fmt;

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Why a text is not an id; its `Display` is the field violation's description the API has always
/// sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdError {
    /// The text is empty.
    Empty,
    /// The text has this many bytes, more than [`MAX_ID_LEN`].
    TooLong(usize),
    /// The text holds a character outside letters, digits and `- _ . : /`.
    BadCharacter,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Empty => f.write_str("is required"),
            IdError::TooLong(len) => write!(f, "is {len} characters long; at most {MAX_ID_LEN} are allowed"),
            IdError::BadCharacter => f.write_str("may contain only letters, digits and - _ . : /"),
        }
    }
}

impl std::error::Error for IdError {}

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/')
}

/// Whether `value` is an id: 1 to [`MAX_ID_LEN`] characters of letters, digits and `- _ . : /`.
///
/// # Errors
/// The first rule `value` breaks.
pub fn check(value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        Err(IdError::Empty)
    } else if value.len() > MAX_ID_LEN {
        Err(IdError::TooLong(value.len()))
    } else if !value.chars().all(id_char) {
        Err(IdError::BadCharacter)
    } else {
        Ok(())
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Parses ", $what, ".")]
            ///
            /// # Errors
            /// When the text breaks an id rule (see [`check`]).
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check(&value)?;
                Ok(Self(value))
            }

            #[doc = concat!("Wraps ", $what, " that was parsed when it entered and is read back from a")]
            /// record of our own (or built from parts that were): it is not checked again. Never for
            /// text from a caller.
            pub fn from_trusted(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's text, owned.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        // Debug shows the text as a string does (`"H200"`): messages quote ids with `{:?}`.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        // Reading an id as text is always allowed; the reverse takes a parse.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl From<&$name> for String {
            fn from(id: &$name) -> String {
                id.0.clone()
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

id_type!(
    /// A buyer (the party that applies for licences and places orders).
    BuyerId,
    "a buyer id"
);
id_type!(
    /// A product, by its SKU: the unit licensing, inventory and orders partition their state by.
    Sku,
    "a product SKU"
);
id_type!(
    /// An order. The orders service hands out `ord-<SKU>-<n>` ([`OrderId::new`]); inventory and
    /// licensing take any id a caller's order has.
    OrderId,
    "an order id"
);
id_type!(
    /// A licence. Licensing hands out `lic-<SKU>-<n>` ([`LicenceId::new`]), so a call naming a
    /// licence finds its product's partition ([`LicenceId::product`]).
    LicenceId,
    "a licence id"
);
id_type!(
    /// An application for a licence.
    ApplicationId,
    "an application id"
);
id_type!(
    /// A wave of import approvals.
    WaveId,
    "a wave id"
);

/// The product and the digits `<n>` of an id `<prefix><SKU>-<n>` (None when `id` has another shape).
fn parts_of<'a>(id: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let (sku, seq) = id.strip_prefix(prefix)?.rsplit_once('-')?;
    (!sku.is_empty() && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit())).then_some((sku, seq))
}

/// The product named by an id `<prefix><SKU>-<n>` (None when `id` has another shape).
fn product_of<'a>(id: &'a str, prefix: &str) -> Option<&'a str> {
    parts_of(id, prefix).map(|(sku, _)| sku)
}

/// `n` when `id` is exactly `<prefix><sku>-<n>` as the services write it (no sign, no leading zero),
/// so that the product and `n` give the id back; None otherwise.
fn number_of(id: &str, prefix: &str, sku: &str) -> Option<u64> {
    let digits = id.strip_prefix(prefix)?.strip_prefix(sku)?.strip_prefix('-')?;
    let n: u64 = digits.parse().ok()?;
    (n.to_string() == digits).then_some(n)
}

impl OrderId {
    /// The id of product `sku`'s order number `seq`: `ord-<SKU>-<seq>`.
    pub fn new(sku: &Sku, seq: u64) -> Self {
        Self(format!("ord-{sku}-{seq}"))
    }

    /// The product this id names (None: not an id the orders service hands out).
    pub fn product(&self) -> Option<Sku> {
        Self::product_str(&self.0).map(Sku::from_trusted)
    }

    /// The product an order id names, as text (None when it is not an order id).
    pub fn product_str(id: &str) -> Option<&str> {
        product_of(id, "ord-")
    }

    /// The product and the digits `<n>` of an id `ord-<SKU>-<n>`, as written (None when it is not an
    /// order id).
    pub fn parts(&self) -> Option<(Sku, &str)> {
        parts_of(&self.0, "ord-").map(|(sku, n)| (Sku::from_trusted(sku), n))
    }

    /// `n` when `id` is exactly `OrderId::new(sku, n)` (what a stored form keeps instead of the id).
    pub fn number_in(id: &str, sku: &str) -> Option<u64> {
        number_of(id, "ord-", sku)
    }
}

impl LicenceId {
    /// The id of product `sku`'s licence number `seq`: `lic-<SKU>-<seq>`.
    pub fn new(sku: &Sku, seq: u64) -> Self {
        Self(format!("lic-{sku}-{seq}"))
    }

    /// The product this id names (None: not an id licensing hands out).
    pub fn product(&self) -> Option<Sku> {
        Self::product_str(&self.0).map(Sku::from_trusted)
    }

    /// The product a licence id names, as text (None when it is not a licence id).
    pub fn product_str(id: &str) -> Option<&str> {
        product_of(id, "lic-")
    }

    /// `n` when `id` is exactly `LicenceId::new(sku, n)` (what a stored form keeps instead of the id).
    pub fn number_in(id: &str, sku: &str) -> Option<u64> {
        number_of(id, "lic-", sku)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_with_the_rules_ids_always_had() {
        assert_eq!(Sku::parse("H200-SXM-141GB").map(|s| s.to_string()), Ok("H200-SXM-141GB".to_string()));
        assert!(BuyerId::parse("acme_co.cn:1/2").is_ok());
        assert!(WaveId::parse("x".repeat(MAX_ID_LEN)).is_ok());
        assert_eq!(BuyerId::parse(""), Err(IdError::Empty));
        assert_eq!(Sku::parse("x".repeat(129)), Err(IdError::TooLong(129)));
        assert_eq!(OrderId::parse("white space"), Err(IdError::BadCharacter));
        assert_eq!(ApplicationId::parse("tab\t"), Err(IdError::BadCharacter));
        assert_eq!(LicenceId::parse("é"), Err(IdError::BadCharacter));
        // The descriptions are the field violations the API has always sent.
        assert_eq!(IdError::Empty.to_string(), "is required");
        assert_eq!(IdError::TooLong(129).to_string(), "is 129 characters long; at most 128 are allowed");
        assert_eq!(IdError::BadCharacter.to_string(), "may contain only letters, digits and - _ . : /");
    }

    #[test]
    fn order_and_licence_ids_name_their_product() {
        let sku = Sku::from_trusted("H200-SXM-141GB");
        let order = OrderId::new(&sku, 129);
        assert_eq!(order, "ord-H200-SXM-141GB-129");
        assert_eq!(order.product(), Some(sku.clone()));
        let licence = LicenceId::new(&sku, 17);
        assert_eq!(licence.as_str(), "lic-H200-SXM-141GB-17");
        assert_eq!(LicenceId::number_in(licence.as_str(), "H200-SXM-141GB"), Some(17));
        assert_eq!(OrderId::number_in(order.as_str(), "H200-SXM-141GB"), Some(129));
        // Only the exact form gives the id back.
        for (id, sku) in
            [("lic-H200-017", "H200"), ("lic-H200-+17", "H200"), ("lic-H200-17", "H20"), ("ord-H200-1", "H200")]
        {
            assert_eq!(LicenceId::number_in(id, sku), None, "{id} {sku}");
        }
        assert_eq!(OrderId::number_in("ord-H200-SXM-1", "H200"), None);
        assert_eq!(licence.product(), Some(sku));
        for not_ours in ["ord-129", "ord--1", "H200-1", "ord-H200-", "ord-H200-12a", "lic-H200-3"] {
            assert_eq!(OrderId::product_str(not_ours), None, "{not_ours}");
        }
        for not_ours in ["lic-404", "lic--3", "lic-H200-", "lic-H200-x", "ord-H200-3"] {
            assert_eq!(LicenceId::product_str(not_ours), None, "{not_ours}");
        }
        // Well-formed ids that name no product are still ids (the caller hears NOT_FOUND).
        assert_eq!(OrderId::parse("o1").map(|o| o.product()), Ok(None));
    }

    #[test]
    fn ids_read_as_text_and_key_sets_by_text() {
        let buyer = BuyerId::parse("acme").unwrap_or_default();
        let set: std::collections::HashSet<BuyerId> = [buyer.clone()].into();
        assert!(set.contains("acme"));
        assert_eq!(buyer.len(), 4);
        assert_eq!(format!("{buyer:?}"), "\"acme\"");
        assert_eq!(String::from(buyer), "acme");
    }
}
