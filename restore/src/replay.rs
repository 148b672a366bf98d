//! Point-in-time restore: the archived log segments that follow a full
//! backup, checked as a chain, and replayed onto the backup's state up to a
//! revision or a time.
//!
//! Replay runs the same [`Applier`] the members run, over the same
//! [`Batch`]es, so a replayed state is the state every member had at that
//! entry. Entries carry the time their proposer proposed them
//! (`RaftRequest.proposed_at_ms`), which is what `--to-time` stops at.
//! Configuration changes only advance the applied index: a restored data
//! dir gets a new single-member cluster anyway.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use prost::Message;
use raft::eraftpb::{Entry, EntryType};
use tern_learner::backup::archive::{decode_segment, SegmentName};
use tern_learner::backup::target::Target;
use tern_primary::apply::{Applier, ApplyError};
use tern_primary::lease::Lessor;
use tern_primary::mvcc::MvccStore;
use tern_primary::proto::ternpb::RaftRequest;

/// Where a point-in-time restore stops.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// The state at this store revision, exactly.
    Revision(i64),
    /// Every entry proposed at or before this time.
    Time(DateTime<Utc>),
    /// Everything archived (a drill: the newest restorable state).
    End,
}

/// One segment object in the store.
#[derive(Clone, Debug)]
pub struct Archived {
    pub name: SegmentName,
    pub path: object_store::path::Path,
    pub stored_at: DateTime<Utc>,
}

/// Every segment in the store, in log order.
pub async fn archived(target: &Target) -> anyhow::Result<Vec<Archived>> {
    let objects: Vec<_> = target
        .store
        .list(Some(&target.root.clone().join("segments")))
        .try_collect()
        .await
        .context("listing log segments")?;
    let mut segments: Vec<Archived> = objects
        .into_iter()
        .filter_map(|o| {
            let name = SegmentName::parse(o.location.filename()?)?;
            Some(Archived {
                name,
                path: o.location,
                stored_at: o.last_modified,
            })
        })
        .collect();
    segments.sort_by_key(|s| (s.name.first, s.name.last));
    Ok(segments)
}

/// The segments that continue the log after entry `after`, up to the first
/// gap.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    pub after: u64,
    pub segments: Vec<Archived>,
    /// Entries missing from the store right after the chain: nothing
    /// beyond them can be replayed.
    pub gap: Option<(u64, u64)>,
}

impl Chain {
    pub fn after(all: &[Archived], after: u64) -> Chain {
        let mut chain = Chain {
            after,
            ..Chain::default()
        };
        let mut next = after.saturating_add(1);
        for s in all {
            if s.name.last < next {
                continue;
            }
            if s.name.first > next {
                chain.gap = Some((next, s.name.first - 1));
                break;
            }
            chain.segments.push(s.clone());
            next = s.name.last.saturating_add(1);
        }
        chain
    }

    /// The last index the chain reaches.
    pub fn end_index(&self) -> u64 {
        self.segments.last().map_or(self.after, |s| s.name.last)
    }

    /// The store revision after the chain's last segment, if its name
    /// records one (or the newest one that does, as a lower bound).
    pub fn reachable_revision(&self) -> Option<i64> {
        self.segments.iter().rev().find_map(|s| s.name.revision)
    }

    /// When the newest segment of the chain was stored.
    pub fn stored_until(&self) -> Option<DateTime<Utc>> {
        self.segments.last().map(|s| s.stored_at)
    }

    /// A missing segment, described for an operator.
    pub fn gap_error(&self) -> Option<String> {
        self.gap.map(|(from, to)| {
            format!(
                "missing segment: log entries {from}..={to} are not in the store (the chain after entry {} breaks there)",
                self.after
            )
        })
    }
}

/// Download, decrypt, decompress and decode one segment; every failure
/// names the segment and what is wrong with it.
pub async fn fetch(
    target: &Target,
    segment: &Archived,
    identities: &[age::x25519::Identity],
) -> anyhow::Result<Vec<Entry>> {
    let label = segment.name.to_string();
    let bytes = target
        .store
        .get(&segment.path)
        .await
        .with_context(|| format!("downloading segment {label}"))?
        .bytes()
        .await
        .with_context(|| format!("downloading segment {label}"))?;
    let identities = identities.to_vec();
    let name = segment.name;
    tokio::task::spawn_blocking(move || {
        let reader = crate::verify::decryptor(&bytes[..], &identities)
            .map_err(|e| anyhow::anyhow!("segment {label}: {e}"))?;
        let mut plain = Vec::new();
        zstd::stream::read::Decoder::new(reader)
            .and_then(|mut d| d.read_to_end(&mut plain))
            .map_err(|e| {
                anyhow::anyhow!("segment {label}: tampered or damaged (decrypting: {e})")
            })?;
        decode_segment(&plain, &name).map_err(|e| anyhow::anyhow!("segment {label}: {e}"))
    })
    .await?
}

/// What a replay reached.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Replayed {
    pub revision: i64,
    pub applied_index: u64,
    pub entries: u64,
    /// When the last replayed request was proposed (if any was).
    pub last_proposed_at: Option<DateTime<Utc>>,
}

/// Replay `chain` onto the state file `state` (at entry `chain.after`)
/// until `until`. Refuses before changing anything when the chain cannot
/// reach a revision target by its names.
pub async fn replay(
    target: &Target,
    chain: &Chain,
    identities: &[age::x25519::Identity],
    state: &std::path::Path,
    until: Until,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Replayed> {
    let start = {
        let conn = tern_primary::mvcc::schema::open_reader(state)?;
        tern_primary::mvcc::read::store_state(&conn)?
    };
    if let Until::Revision(want) = until {
        if want < start.revision {
            bail!(
                "revision {want} is before the backup's revision {}",
                start.revision
            );
        }
        let names_reach = chain.reachable_revision().unwrap_or(start.revision);
        let last_named = chain.segments.last().and_then(|s| s.name.revision);
        if want > names_reach && last_named.is_some() {
            match chain.gap_error() {
                Some(gap) => bail!("revision {want} cannot be reached: {gap}"),
                None => bail!(
                    "revision {want} is beyond the archived log, which reaches revision {names_reach}"
                ),
            }
        }
    }
    let mut reached = Replayed {
        revision: start.revision,
        applied_index: start.applied_index,
        entries: 0,
        last_proposed_at: None,
    };
    progress.set_length(chain.segments.len() as u64);
    let mut target_reached = false;
    for segment in &chain.segments {
        let entries = fetch(target, segment, identities).await?;
        let state = state.to_path_buf();
        let (next, finished) =
            tokio::task::spawn_blocking(move || apply(&state, entries, until, reached)).await??;
        reached = next;
        progress.inc(1);
        if finished {
            target_reached = true;
            break;
        }
    }
    if let (Until::Time(t), false) = (until, target_reached) {
        // The log stopped before passing the time: at a gap, a restore to
        // that time is not possible (the newest write before it may be in
        // the missing entries).
        if let Some(gap) = chain.gap_error() {
            bail!("{} cannot be reached: {gap}", t.to_rfc3339());
        }
    }
    if let Until::Revision(want) = until {
        if reached.revision < want {
            let why = chain.gap_error().unwrap_or_else(|| {
                format!(
                    "the archived log ends at entry {} (revision {})",
                    reached.applied_index, reached.revision
                )
            });
            bail!("revision {want} cannot be reached: {why}");
        }
    }
    Ok(reached)
}

/// Apply `entries` (those after the state's applied index) in one
/// transaction; returns what was reached and whether the target was.
/// A revision target stops only at the first entry that would pass it:
/// entries that change no revision (a compaction, a lease grant) after
/// the target revision's write were part of the state at that revision.
fn apply(
    state: &std::path::Path,
    entries: Vec<Entry>,
    until: Until,
    mut reached: Replayed,
) -> anyhow::Result<(Replayed, bool)> {
    let mut store = MvccStore::open(state)?;
    // Leases only matter here as rows; nothing expires during a replay
    // (expiry is itself a replicated revoke).
    let lessor = Arc::new(Lessor::new(Duration::from_secs(1)));
    let mut applier = Applier::new(lessor, store.connection())?;
    let mut batch = store.batch()?;
    let mut finished = false;
    let mut previous = (batch.state().applied_index, batch.state().applied_term);
    for entry in entries {
        let (index, term) = (entry.index, entry.term);
        if index <= previous.0 {
            continue;
        }
        let request = match entry.get_entry_type() {
            EntryType::EntryNormal if !entry.data.is_empty() => {
                RaftRequest::decode(&entry.data[..])
                    .with_context(|| format!("log entry {index} is not a Tern request"))?
            }
            // Empty entries (a new leader's) and configuration changes.
            _ => {
                batch.skip(index, term);
                previous = (index, term);
                continue;
            }
        };
        if let Until::Time(t) = until {
            if request.proposed_at_ms == 0 {
                bail!(
                    "log entry {index} records no proposal time (written by an older Tern): restore to a revision instead"
                );
            }
            if request.proposed_at_ms > t.timestamp_millis().max(0) as u64 {
                finished = true;
                break;
            }
        }
        let Some(r) = request.request else {
            batch.skip(index, term);
            previous = (index, term);
            continue;
        };
        let mut overshoot = false;
        let result = batch.entry(index, term, |b| {
            let result = applier.apply(b, r);
            if let Until::Revision(want) = until {
                if result.is_ok() && b.read_revision() > want {
                    // Past the target: roll this entry back.
                    overshoot = true;
                    return Err(ApplyError::FutureRevision);
                }
            }
            result
        });
        if overshoot {
            batch.skip(previous.0, previous.1);
            finished = true;
            break;
        }
        if let Err(ApplyError::Storage(e)) = result {
            bail!("applying log entry {index}: {e}");
        }
        previous = (index, term);
        reached.entries += 1;
        reached.last_proposed_at = DateTime::from_timestamp_millis(request.proposed_at_ms as i64)
            .filter(|_| request.proposed_at_ms > 0);
    }
    let state = batch.state();
    batch.commit()?;
    store.checkpoint()?;
    reached.revision = state.revision;
    reached.applied_index = state.applied_index;
    Ok((reached, finished))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first: u64, last: u64, revision: Option<i64>) -> Archived {
        Archived {
            name: SegmentName {
                first,
                last,
                revision,
            },
            path: object_store::path::Path::from(format!("s/{first}")),
            stored_at: DateTime::from_timestamp(first as i64, 0).unwrap(),
        }
    }

    #[test]
    fn a_chain_starts_at_the_segment_holding_the_next_entry_and_stops_at_a_gap() {
        let all = [
            seg(1, 10, Some(5)),
            seg(11, 20, Some(9)),
            seg(21, 30, None),
            seg(41, 50, Some(30)),
        ];
        let c = Chain::after(&all, 14);
        assert_eq!(
            c.segments.iter().map(|s| s.name.first).collect::<Vec<_>>(),
            [11, 21]
        );
        assert_eq!(c.gap, Some((31, 40)));
        assert_eq!(c.end_index(), 30);
        assert_eq!(c.reachable_revision(), Some(9));
        assert!(c.gap_error().unwrap().contains("31..=40"));

        let c = Chain::after(&all, 50);
        assert!(c.segments.is_empty() && c.gap.is_none());
        assert_eq!(c.end_index(), 50);

        let c = Chain::after(&all[1..], 3);
        assert!(c.segments.is_empty());
        assert_eq!(c.gap, Some((4, 10)));
    }
}
