//! Decoding PostgreSQL column values into [`Value`]s.
//!
//! Two wire forms reach the daemon: the text output that pgoutput sends for
//! changed rows ([`text`]) and the binary send format of
//! `COPY … TO STDOUT (FORMAT binary)` used for snapshots ([`binary`]). Both
//! produce the same [`Value`] for the same column value.
//!
//! Contract of this module and its children: pure functions, no I/O, and no
//! panic on any input, however malformed; bad input yields a
//! [`DecodeError`]. SQL NULL is handled by callers, never passed in here
//! (except NULL array elements and NULL COPY fields, which decode to
//! [`Value::Null`]). Error messages quote at most 40 bytes of an offending
//! value, because values can be personal data.
//!
//! [`Value`]: crate::mapping::value::Value
//! [`Value::Null`]: crate::mapping::value::Value::Null

pub mod binary;
pub mod copy_binary;
pub mod text;

use crate::mapping::value::oid;

/// Why a value could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot decode {type_name} value: {detail}")]
pub struct DecodeError {
    /// The PostgreSQL type's name (`integer`, `text[]`…), or `type OID n`
    /// when the name is not known.
    pub type_name: String,
    /// What was wrong, quoting at most 40 bytes of the value.
    pub detail: String,
}

/// Most bytes of an offending value that an error message may quote.
const QUOTE_MAX: usize = 40;

/// Builds a [`DecodeError`] for a value of type `oid` called `name`.
pub(crate) fn error(oid: u32, name: &str, detail: impl Into<String>) -> DecodeError {
    let type_name = if !name.is_empty() {
        name.to_owned()
    } else if let Some(n) = builtin_name(oid) {
        n.to_owned()
    } else {
        format!("type OID {oid}")
    };
    DecodeError {
        type_name,
        detail: detail.into(),
    }
}

/// Quotes (Rust string escaping, so control characters cannot garble a log
/// line) at most [`QUOTE_MAX`] bytes of `value`, ending with `…` when cut.
pub(crate) fn quote(value: &[u8]) -> String {
    let cut = value.len() > QUOTE_MAX;
    let head = if cut { &value[..QUOTE_MAX] } else { value };
    let mut s = match std::str::from_utf8(head) {
        Ok(s) => s.to_owned(),
        // Cut inside a multi-byte character: drop its first bytes.
        Err(e) if cut && e.error_len().is_none() => {
            String::from_utf8_lossy(&head[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(head).into_owned(),
    };
    if cut {
        s.push('…');
    }
    format!("{s:?}")
}

/// `bytes` as UTF-8 text, or an error that says where it is not (without
/// quoting the bytes).
pub(crate) fn utf8<'a>(oid: u32, name: &str, bytes: &'a [u8]) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|e| {
        error(
            oid,
            name,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })
}

/// Scalar types this module decodes itself: their `elem` is never taken as
/// an array element type (`pg_type.typelem` is set for `name`, for one).
fn is_known_scalar(o: u32) -> bool {
    oid::is_native(o) || o == oid::BYTEA
}

/// The element type OID when a column of type `ty_oid` (with the caller's
/// `elem`) is an array, `None` for scalars.
pub(crate) fn element_oid(ty_oid: u32, elem: Option<u32>) -> Option<u32> {
    if is_known_scalar(ty_oid) {
        None
    } else {
        elem.or_else(|| oid::array_elem(ty_oid))
    }
}

/// The name of the element type of the array type called `array_name`:
/// the name without its `[]`, else the built-in name, else `""`.
pub(crate) fn element_name(array_name: &str, elem: u32) -> &str {
    match array_name.strip_suffix("[]") {
        Some(n) => n,
        None => builtin_name(elem).unwrap_or(""),
    }
}

/// `format_type` names of the well-known types.
fn builtin_name(o: u32) -> Option<&'static str> {
    Some(match o {
        oid::BOOL => "boolean",
        oid::BYTEA => "bytea",
        oid::CHAR => "\"char\"",
        oid::NAME => "name",
        oid::INT8 => "bigint",
        oid::INT2 => "smallint",
        oid::INT4 => "integer",
        oid::TEXT => "text",
        oid::OID => "oid",
        oid::JSON => "json",
        oid::FLOAT4 => "real",
        oid::FLOAT8 => "double precision",
        oid::BPCHAR => "character",
        oid::VARCHAR => "character varying",
        oid::DATE => "date",
        oid::TIMESTAMP => "timestamp without time zone",
        oid::TIMESTAMPTZ => "timestamp with time zone",
        oid::NUMERIC => "numeric",
        oid::UUID => "uuid",
        oid::JSONB => "jsonb",
        oid::BOOL_ARRAY => "boolean[]",
        oid::INT2_ARRAY => "smallint[]",
        oid::INT4_ARRAY => "integer[]",
        oid::INT8_ARRAY => "bigint[]",
        oid::TEXT_ARRAY => "text[]",
        oid::BPCHAR_ARRAY => "character[]",
        oid::VARCHAR_ARRAY => "character varying[]",
        oid::FLOAT4_ARRAY => "real[]",
        oid::FLOAT8_ARRAY => "double precision[]",
        oid::DATE_ARRAY => "date[]",
        oid::TIMESTAMP_ARRAY => "timestamp without time zone[]",
        oid::TIMESTAMPTZ_ARRAY => "timestamp with time zone[]",
        oid::NUMERIC_ARRAY => "numeric[]",
        oid::UUID_ARRAY => "uuid[]",
        oid::JSON_ARRAY => "json[]",
        oid::JSONB_ARRAY => "jsonb[]",
        _ => return None,
    })
}

/// Every natively decoded OID, `bytea`, and the array OIDs built on them
/// (36 in all), for property tests.
#[cfg(test)]
pub(crate) fn test_oids() -> Vec<u32> {
    let mut v: Vec<u32> = (0..100_000).filter(|&o| is_known_scalar(o)).collect();
    v.extend((0..100_000).filter(|&o| oid::array_elem(o).is_some()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_names_the_type() {
        let e = error(
            oid::INT4,
            "integer",
            format!("{} is not an integer", quote(b"12x")),
        );
        assert_eq!(
            e.to_string(),
            "cannot decode integer value: \"12x\" is not an integer"
        );
        assert_eq!(error(oid::INT4, "", "x").type_name, "integer");
        assert_eq!(error(99_999, "", "x").type_name, "type OID 99999");
        assert_eq!(error(99_999, "mood", "x").type_name, "mood");
    }

    #[test]
    fn quotes_are_short() {
        assert_eq!(quote(b"abc"), "\"abc\"");
        let long = "x".repeat(100);
        let q = quote(long.as_bytes());
        assert_eq!(q, format!("\"{}…\"", "x".repeat(40)));
        // Cut inside a multi-byte character: the partial character is dropped.
        let tokyo = "東京".repeat(10);
        let q = quote(tokyo.as_bytes());
        assert!(q.len() <= 40 + "…".len() + 2, "{q}");
        assert!(q.ends_with("…\""));
        assert!(!q.contains('\u{FFFD}'));
        // Control characters are escaped.
        assert_eq!(quote(b"a\nb\"c"), "\"a\\nb\\\"c\"");
        // Invalid UTF-8 is shown lossily.
        assert_eq!(quote(b"a\xffb"), "\"a\u{FFFD}b\"");
    }

    #[test]
    fn test_oid_list_is_complete() {
        let v = test_oids();
        assert_eq!(v.len(), 36);
        assert!(v.contains(&oid::BYTEA) && v.contains(&oid::JSONB_ARRAY));
    }

    #[test]
    fn element_types() {
        assert_eq!(element_oid(oid::INT4_ARRAY, None), Some(oid::INT4));
        assert_eq!(
            element_oid(oid::INT4_ARRAY, Some(oid::INT4)),
            Some(oid::INT4)
        );
        assert_eq!(element_oid(oid::INT4, None), None);
        // `name` has typelem = "char" in pg_type; it is still a scalar.
        assert_eq!(element_oid(oid::NAME, Some(oid::CHAR)), None);
        assert_eq!(element_oid(1001, Some(oid::BYTEA)), Some(oid::BYTEA));
        assert_eq!(element_oid(99_999, None), None);
        assert_eq!(element_name("integer[]", oid::INT4), "integer");
        assert_eq!(element_name("", oid::INT4), "integer");
        assert_eq!(element_name("my_domain", 99_999), "");
    }
}
