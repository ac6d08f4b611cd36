//! Pagination for ListVolumes and ListSnapshots.
//!
//! A token names the last ID of the previous page; the next page starts after it in ID order. So a
//! token stays valid when that very object is deleted, objects created meanwhile are seen when they
//! sort after it, and nothing is listed twice. Tokens are opaque (`c1.` + hex) so a token from
//! elsewhere is refused with ABORTED instead of being misread.

use crate::controller::error::ControllerError;

const PREFIX: &str = "c1.";

pub fn token_after(last_id: &str) -> String {
    format!("{PREFIX}{}", hex::encode(last_id))
}

/// The ID a token says to start after; `None` for no token.
pub fn parse_token(token: &str) -> Result<Option<String>, ControllerError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        ControllerError::StaleToken(format!(
            "starting_token '{token}' was not issued by this driver; list again without it"
        ))
    };
    let hexed = token.strip_prefix(PREFIX).ok_or_else(bad)?;
    let bytes = hex::decode(hexed).map_err(|_| bad())?;
    String::from_utf8(bytes).map(Some).map_err(|_| bad())
}

/// Checks a listing's paging arguments before anything is listed (arguments before existence):
/// the id the token names, if any.
pub fn check(token: &str, max: i32) -> Result<Option<String>, ControllerError> {
    if max < 0 {
        return Err(ControllerError::invalid(format!(
            "max_entries must not be negative, got {max}"
        )));
    }
    parse_token(token)
}

/// The most bytes of entries one ListVolumes or ListSnapshots answer carries, whatever
/// `max_entries` asked (0 included, which CSI lets a plugin page anyway): a gRPC client takes
/// answers of 4 MiB by default (the sidecars, csi-sanity), and one larger fails the whole call.
pub const MAX_ANSWER_BYTES: usize = 3 << 20;

/// Cuts a page's entries, built in id order, to [`MAX_ANSWER_BYTES`] (at least one entry stays),
/// and answers the next token: after the last entry kept when some were cut, else `next` as it was.
pub fn fit<E: prost::Message>(entries: &mut Vec<E>, next: String, id: impl Fn(&E) -> String) -> String {
    let mut bytes = 0usize;
    let kept = entries
        .iter()
        .position(|e| {
            let len = e.encoded_len();
            bytes += len + prost::length_delimiter_len(len) + 1;
            bytes > MAX_ANSWER_BYTES
        })
        .map_or(entries.len(), |i| i.max(1));
    if kept == entries.len() {
        return next;
    }
    entries.truncate(kept);
    token_after(&id(&entries[kept - 1]))
}

/// One page of `items` (sorted by the text of their `id`): those after the token, at most `max` (0: all).
pub fn page<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> String,
    token: &str,
    max: i32,
) -> Result<(Vec<T>, String), ControllerError> {
    let after = check(token, max)?;
    let mut rest: Vec<T> = match after {
        Some(a) => items.into_iter().filter(|t| id(t).as_str() > a.as_str()).collect(),
        None => items,
    };
    let mut next = String::new();
    if max > 0 && rest.len() > max as usize {
        rest.truncate(max as usize);
        next = token_after(&id(&rest[rest.len() - 1]));
    }
    Ok((rest, next))
}

/// One page of `items`, already sorted by the text of their `id`: found by binary search after the token, so each
/// page costs its own length, not the whole listing's.
pub fn page_sorted<'a, T>(
    items: &'a [T],
    id: impl Fn(&T) -> String,
    token: &str,
    max: i32,
) -> Result<(&'a [T], String), ControllerError> {
    let start = match check(token, max)? {
        Some(a) => items.partition_point(|t| id(t).as_str() <= a.as_str()),
        None => 0,
    };
    let rest = &items[start..];
    if max > 0 && rest.len() > max as usize {
        let page = &rest[..max as usize];
        return Ok((page, token_after(&id(&page[page.len() - 1]))));
    }
    Ok((rest, String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pages_cover_everything_once() {
        let all = ids(&["a", "b", "c", "d", "e"]);
        let (p1, t1) = page(all.clone(), |s| s.clone(), "", 2).unwrap();
        assert_eq!(p1, ids(&["a", "b"]));
        let (p2, t2) = page(all.clone(), |s| s.clone(), &t1, 2).unwrap();
        assert_eq!(p2, ids(&["c", "d"]));
        let (p3, t3) = page(all, |s| s.clone(), &t2, 2).unwrap();
        assert_eq!(p3, ids(&["e"]));
        assert!(t3.is_empty());
    }

    #[test]
    fn sorted_pages_cover_everything_once_and_match_the_plain_pages() {
        let all = ids(&["a", "b", "c", "d", "e"]);
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let (p, t) = page_sorted(&all, |s| s.clone(), &token, 2).unwrap();
            let (q, u) = page(all.clone(), |s| s.clone(), &token, 2).unwrap();
            assert_eq!((p.to_vec(), &t), (q, &u));
            seen.extend_from_slice(p);
            if t.is_empty() {
                break;
            }
            token = t;
        }
        assert_eq!(seen, all);
        let (_, t) = page_sorted(&all, |s| s.clone(), "", 2).unwrap();
        let later = ids(&["a", "c", "z"]);
        let (p, _) = page_sorted(&later, |s| s.clone(), &t, 0).unwrap();
        assert_eq!(p, &ids(&["c", "z"])[..]);
        assert_eq!(
            page_sorted(&all, |s| s.clone(), "", -1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    /// An unpaged answer of a large cluster outgrew what a gRPC client takes (4 MiB by default),
    /// failing the whole call; it is now cut by bytes, with a token for the rest.
    #[test]
    fn an_answer_is_cut_by_bytes_with_a_token_for_the_rest_whatever_was_asked() {
        use prost::Message;
        let entry = "e".repeat(64 << 10);
        let all: Vec<String> = (0..100).map(|i| format!("{i:03}{entry}")).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = page(all.clone(), |s| s.clone(), &token, 0).unwrap();
            let mut entries = page;
            let next = fit(&mut entries, next, |s| s.clone());
            let bytes: usize = entries.iter().map(|e| e.encoded_len() + 4).sum();
            assert!(bytes <= MAX_ANSWER_BYTES, "{bytes}");
            seen.extend(entries);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, all, "every entry once, in order");
        let mut small = ids(&["a", "b"]);
        assert_eq!(fit(&mut small, "kept".into(), |s| s.clone()), "kept");
        assert_eq!(small.len(), 2);
        let mut huge = vec!["x".repeat(MAX_ANSWER_BYTES + 1), "y".into()];
        let next = fit(&mut huge, String::new(), |s| s.clone());
        assert_eq!(
            (huge.len(), parse_token(&next).unwrap()),
            (1, Some("x".repeat(MAX_ANSWER_BYTES + 1)))
        );
    }

    #[test]
    fn token_survives_deletion_of_its_object() {
        let (_, t) = page(ids(&["a", "b", "c"]), |s| s.clone(), "", 2).unwrap();
        let (p, _) = page(ids(&["a", "c", "z"]), |s| s.clone(), &t, 0).unwrap();
        assert_eq!(p, ids(&["c", "z"]));
    }

    #[test]
    fn foreign_token_is_aborted() {
        let e = page(ids(&["a"]), |s| s.clone(), "invalid-token", 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert_eq!(
            page(ids(&["a"]), |s| s.clone(), "c1.zz", 0).unwrap_err().code(),
            tonic::Code::Aborted
        );
    }

    #[test]
    fn negative_max_is_invalid() {
        assert_eq!(
            page(ids(&["a"]), |s| s.clone(), "", -1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
