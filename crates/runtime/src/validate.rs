//! Input validation shared by every service: ids, SKUs, free text, countries, request ids.
//! Each check records a field violation instead of failing fast, so one answer lists every problem.

use crate::errors::Violations;

/// Longest id, SKU or request id accepted.
pub const MAX_ID_LEN: usize = 128;
/// Longest free text accepted (end use, reasons, justifications).
pub const MAX_TEXT_LEN: usize = 2000;

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/')
}

/// An identifier: 1-128 characters of letters, digits and `- _ . : /`.
pub fn id(v: &mut Violations, field: &str, value: &str) {
    if value.is_empty() {
        v.add(field, "is required");
    } else if value.len() > MAX_ID_LEN {
        v.add(field, format!("is {} characters long; at most {MAX_ID_LEN} are allowed", value.len()));
    } else if !value.chars().all(id_char) {
        v.add(field, "may contain only letters, digits and - _ . : /");
    }
}

/// An optional identifier: empty, or valid as [`id`].
pub fn optional_id(v: &mut Violations, field: &str, value: &str) {
    if !value.is_empty() {
        id(v, field, value);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
