//! etcd's key-range permission check (`auth/range_perm_cache.go`).
//!
//! A permission is a single key (empty range end), a range `[key, end)`, or
//! open-ended (`end == "\0"`: every key from `key` on). A request on one
//! key needs a permission containing it; a request on a range needs the
//! union of the user's permissions of that kind to cover the whole range
//! (etcd's interval tree `Contains`). A request range end of `"\0"` (etcd's
//! "from key") is open-ended too.

use super::Role;
use crate::proto::authpb::permission::Type as PermType;

/// An interval end; `None` is past every key (etcd's empty
/// `BytesAffineComparable`, the largest element).
type End = Option<Vec<u8>>;

fn open_ended(range_end: &[u8]) -> bool {
    range_end == [0]
}

/// Whether etcd accepts a permission on `[key, range_end)`.
pub fn valid_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || key < range_end || open_ended(range_end))
}

/// The interval a stored permission covers.
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    if range_end.is_empty() {
        // A single key: [key, key + "\0").
        let mut end = key.to_vec();
        end.push(0);
        (key.to_vec(), Some(end))
    } else if open_ended(range_end) {
        (key.to_vec(), None)
    } else {
        (key.to_vec(), Some(range_end.to_vec()))
    }
}

fn grants(perm_type: i32, kind: PermType) -> bool {
    perm_type == PermType::Readwrite as i32 || perm_type == kind as i32
}

/// Whether `roles` together allow `kind` on the key or range.
pub fn permitted<'a>(
    roles: impl Iterator<Item = &'a Role>,
    key: &[u8],
    range_end: &[u8],
    kind: PermType,
) -> bool {
    let mut intervals: Vec<(Vec<u8>, End)> = roles
        .flat_map(|r| r.permissions.iter())
        .filter(|p| grants(p.perm_type, kind))
        .map(|p| interval(&p.key, &p.range_end))
        .collect();
    if range_end.is_empty() {
        return intervals
            .iter()
            .any(|(begin, end)| begin.as_slice() <= key && end.as_deref().is_none_or(|e| key < e));
    }
    let want_end: End = if open_ended(range_end) {
        None
    } else {
        Some(range_end.to_vec())
    };
    // Sweep the intervals in start order, extending what is covered from
    // `key` on; a gap before the wanted end means not covered.
    intervals.sort();
    let mut covered: End = Some(key.to_vec());
    for (begin, end) in intervals {
        let Some(reach) = &covered else { break };
        if begin.as_slice() > reach.as_slice() {
            break;
        }
        covered = match (&end, &covered) {
            (None, _) => None,
            (Some(e), Some(c)) if e > c => Some(e.clone()),
            _ => covered,
        };
    }
    match (covered, want_end) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(c), Some(w)) => c >= w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::authpb::Permission;

    fn role(perms: &[(&str, &[u8], PermType)]) -> Role {
        Role {
            permissions: perms
                .iter()
                .map(|(k, e, t)| Permission {
                    perm_type: *t as i32,
                    key: k.as_bytes().to_vec(),
                    range_end: e.to_vec(),
                })
                .collect(),
        }
    }

    fn ok(r: &Role, key: &str, end: &[u8], kind: PermType) -> bool {
        permitted(std::iter::once(r), key.as_bytes(), end, kind)
    }

    #[test]
    fn prefix_single_and_open_ended_permissions() {
        use PermType::*;
        // `--prefix /a/` is [/a/, /a0).
        let r = role(&[("/a/", b"/a0", Read), ("k", b"", Readwrite)]);
        assert!(ok(&r, "/a/x", b"", Read));
        assert!(!ok(&r, "/a/x", b"", Write));
        assert!(!ok(&r, "/b/x", b"", Read));
        assert!(ok(&r, "/a/", b"/a0", Read));
        assert!(ok(&r, "/a/b", b"/a/c", Read));
        assert!(!ok(&r, "/a/", b"/b", Read));
        assert!(!ok(&r, "/a/", &[0], Read), "from-key reaches past /a0");
        assert!(ok(&r, "k", b"", Write));
        assert!(ok(&r, "k", b"k\0", Read));
        assert!(!ok(&r, "k", b"l", Read));
        // Open-ended permission covers every key from its start.
        let all = role(&[("\0", &[0], Read)]);
        assert!(ok(&all, "anything", &[0], Read));
        assert!(ok(&all, "\0", &[0], Read));
        // Adjacent permissions together cover a range.
        let split = role(&[("a", b"c", Read), ("c", b"e", Read)]);
        assert!(ok(&split, "a", b"e", Read));
        assert!(!ok(&split, "a", b"f", Read));
    }

    #[test]
    fn valid_ranges() {
        assert!(valid_range(b"a", b""));
        assert!(valid_range(b"a", b"b"));
        assert!(valid_range(b"a", &[0]));
        assert!(!valid_range(b"b", b"a"));
        assert!(!valid_range(b"", b"a"));
    }
}
