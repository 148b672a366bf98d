//! The backups in a store: every manifest under `<prefix>/backups/`,
//! newest first. A manifest that cannot be read or parsed is listed as
//! unreadable rather than hidden.

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use tern_learner::backup::manifest::{self, Manifest};
use tern_learner::backup::target::Target;

pub enum Entry {
    Ok(Box<Manifest>),
    Unreadable { id: String, error: String },
}

/// Every backup, newest first (ids sort by time).
pub async fn list(target: &Target) -> anyhow::Result<Vec<Entry>> {
    let objects: Vec<_> = target
        .store
        .list(Some(&target.backups))
        .try_collect()
        .await?;
    let mut ids: Vec<String> = objects
        .iter()
        .filter_map(|o| o.location.filename())
        .filter_map(manifest::id_of_manifest)
        .map(str::to_string)
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let mut entries = Vec::with_capacity(ids.len());
    for id in ids {
        let read = async {
            let bytes = target
                .store
                .get(&target.path(&manifest::manifest_name(&id)))
                .await?
                .bytes()
                .await?;
            Ok::<Manifest, anyhow::Error>(serde_json::from_slice(&bytes)?)
        }
        .await;
        entries.push(match read {
            // A manifest copied over another backup's would restore the
            // wrong state under the right name.
            Ok(m) if m.id != id => Entry::Unreadable {
                error: format!(
                    "the manifest stored as {id} describes backup {} (swapped or renamed)",
                    m.id
                ),
                id,
            },
            Ok(m) => Entry::Ok(Box::new(m)),
            Err(e) => Entry::Unreadable {
                id,
                error: format!("{e:#}"),
            },
        });
    }
    Ok(entries)
}

/// The manifest of backup `id`, or of the newest one. A newest backup
/// whose manifest does not read is an error, not a reason to fall back
/// silently to an older one: name the older one to restore it.
pub async fn find(target: &Target, id: Option<&str>) -> anyhow::Result<Manifest> {
    for entry in list(target).await? {
        match (entry, id) {
            (Entry::Ok(m), None) => return Ok(*m),
            (Entry::Unreadable { id: got, error }, None) => {
                anyhow::bail!("newest backup {got}: unreadable manifest: {error}")
            }
            (Entry::Ok(m), Some(want)) if m.id == want => return Ok(*m),
            (Entry::Unreadable { id: got, error }, Some(want)) if got == want => {
                anyhow::bail!("backup {want}: unreadable manifest: {error}")
            }
            _ => {}
        }
    }
    match id {
        Some(want) => anyhow::bail!("no backup {want} in {}", target.url),
        None => anyhow::bail!("no backup in {}", target.url),
    }
}

/// The newest backup a point-in-time restore to `until` can start from:
/// at or before that revision, or finished at or before that time.
pub async fn before(target: &Target, until: crate::replay::Until) -> anyhow::Result<Manifest> {
    use crate::replay::Until;
    let mut oldest = None;
    for entry in list(target).await? {
        let Entry::Ok(m) = entry else { continue };
        let fits = match until {
            Until::Revision(r) => m.revision <= r,
            // Not started_at: writes applied while the state was being
            // copied are in the backup, and a replay cannot take them out.
            Until::Time(t) => m.finished_at <= t,
            Until::End => true,
        };
        if fits {
            return Ok(*m);
        }
        oldest = Some(m);
    }
    match (until, oldest) {
        (Until::End, _) | (_, None) => anyhow::bail!("no backup in {}", target.url),
        (Until::Revision(r), Some(m)) => anyhow::bail!(
            "no backup at or before revision {r}: the oldest, {}, is at revision {}",
            m.id,
            m.revision
        ),
        (Until::Time(t), Some(m)) => anyhow::bail!(
            "no backup finished at or before {}: the oldest, {}, finished {}",
            t.to_rfc3339(),
            m.id,
            m.finished_at.to_rfc3339()
        ),
    }
}
