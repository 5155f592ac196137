//! The AnyConnect protocol's wire formats and negotiation, without I/O:
//! the HTTP exchange before the tunnel (`http`), the aggregate-auth XML
//! (`auth_xml`), CONNECT negotiation (`connect`) and CSTP framing
//! (`cstp`). Nothing here imports from the rest of the crate.

pub mod auth_xml;
pub mod connect;
pub mod cstp;
pub mod dpd;
pub mod http;
pub mod identity;
pub mod radius;

/// The longest client-chosen string (a user name, say) an event or log
/// line carries.
pub const MAX_CLIENT_STRING: usize = 64;

/// A string a client chose, fit for a log: at most [`MAX_CLIENT_STRING`]
/// characters (an ellipsis says it was cut), control characters escaped.
/// A user who types a password into the user name field, or a flood of
/// 64 KiB names, must not end up in the logs whole.
pub fn client_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_CLIENT_STRING + 8));
    for (i, c) in s.chars().enumerate() {
        if i == MAX_CLIENT_STRING {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_strings_are_cut_and_escaped() {
        assert_eq!(client_string("alice"), "alice");
        assert_eq!(client_string("a\nb\u{1b}"), "a\\nb\\u{1b}");
        let long = client_string(&"x".repeat(70_000));
        assert_eq!(long.chars().count(), MAX_CLIENT_STRING + 1);
        assert!(long.ends_with('…'));
    }
}
