//! Cluster and member ids, computed exactly as etcd computes them, so the
//! same flags give the same ids (etcd's default member is 8e9e05c52164694d).

use sha1::{Digest, Sha1};

/// etcd's computeMemberId: sha1 of the sorted peer URLs, the cluster token
/// (and a timestamp for members added at runtime).
pub fn member_id(peer_urls: &[String], token: &str, now_unix: Option<i64>) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut bytes = urls.concat().into_bytes();
    bytes.extend_from_slice(token.as_bytes());
    if let Some(t) = now_unix {
        bytes.extend_from_slice(t.to_string().as_bytes());
    }
    first_u64(&Sha1::digest(&bytes))
}

/// etcd's genID: sha1 over the sorted member ids, big-endian.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
    first_u64(&Sha1::digest(&bytes))
}

fn first_u64(digest: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_default_ids() {
        let id = member_id(&["http://localhost:2380".to_string()], "etcd-cluster", None);
        assert_eq!(id, 0x8e9e05c52164694d);
        assert_eq!(cluster_id(&[id]), 14841639068965178418);
    }
}
