//! Whether the data dir's filesystem has room for one more write, without
//! a `statvfs` for every put.
//!
//! Every proposal is checked against [`DISK_RESERVE_BYTES`] of free space
//! (see [`crate::member::Member::check_quota`]). A `statvfs` walks the
//! path and asks the filesystem each time: at 100 clients it was 1.8% of
//! the process's CPU, more than the rest of the put handler. So the free
//! space read is kept for [`FRESH_FOR`] and lowered by what each write
//! admitted meanwhile may take ([`DISK_BYTES_PER_REQUEST_BYTE`] for each
//! byte of the request). A write is only ever refused on a fresh reading,
//! by the same test as before (free space at least the reserve plus the
//! request): when the estimate says no, the filesystem is asked again.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Free space a write must leave on the data dir's filesystem. Below it a
/// write is refused and the NOSPACE alarm raised (through the log, which
/// needs a little of this room), as for the backend quota, so a filling
/// disk never reaches a failed log append: the Raft log, SQLite's WAL and
/// snapshot copies all need headroom. etcd has no such check and stops
/// when its WAL write fails.
pub const DISK_RESERVE_BYTES: u64 = 32 * 1024 * 1024;

/// How long a reading of the free space stands in for a new one. At the
/// fastest this machine writes (~100 MB/s) the disk fills by at most 1 MB
/// in that time beyond what the estimate subtracts, far inside the
/// reserve.
const FRESH_FOR: Duration = Duration::from_millis(10);

/// Disk a request takes per byte, as the estimate counts it: its entry in
/// the log, the state row and that row's WAL frame, with room to spare.
const DISK_BYTES_PER_REQUEST_BYTE: u64 = 4;

pub struct DiskRoom {
    dir: PathBuf,
    reserve: u64,
    fresh_for: Duration,
    /// When the free space was last read, and what is left of it after the
    /// writes admitted since.
    estimate: Mutex<Option<(Instant, u64)>>,
}

impl DiskRoom {
    pub fn new(dir: PathBuf) -> DiskRoom {
        DiskRoom::with_reserve(dir, DISK_RESERVE_BYTES)
    }

    fn with_reserve(dir: PathBuf, reserve: u64) -> DiskRoom {
        DiskRoom::with_settings(dir, reserve, FRESH_FOR)
    }

    fn with_settings(dir: PathBuf, reserve: u64, fresh_for: Duration) -> DiskRoom {
        DiskRoom {
            dir,
            reserve,
            fresh_for,
            estimate: Mutex::new(None),
        }
    }

    /// Whether a request of `cost` bytes leaves the reserve free (the same
    /// test as a `statvfs` per request made); if so, its share is taken
    /// off the estimate. If the free space cannot be read, the check does
    /// not stand in the way.
    pub fn admit(&self, cost: usize) -> bool {
        let share = (cost as u64).saturating_mul(DISK_BYTES_PER_REQUEST_BYTE);
        let mut estimate = self
            .estimate
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((at, free)) = estimate.as_mut() {
            if at.elapsed() < self.fresh_for && *free >= self.reserve + share {
                *free -= share;
                return true;
            }
        }
        let Ok(fs) = rustix::fs::statvfs(&self.dir) else {
            return true;
        };
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        let room = free >= self.reserve + cost as u64;
        *estimate = Some((
            Instant::now(),
            if room {
                free.saturating_sub(share)
            } else {
                free
            },
        ));
        room
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AN_HOUR: Duration = Duration::from_secs(3600);

    fn free_bytes(dir: &std::path::Path) -> u64 {
        let fs = rustix::fs::statvfs(dir).unwrap();
        fs.f_bavail * fs.f_frsize
    }

    fn estimate(room: &DiskRoom) -> u64 {
        room.estimate.lock().unwrap().unwrap().1
    }

    #[test]
    fn admits_while_the_reserve_stays_free() {
        let dir = tempfile::tempdir().unwrap();
        let room = DiskRoom::new(dir.path().to_path_buf());
        assert!(room.admit(1024));
        assert!(room.admit(1024));
    }

    #[test]
    fn refuses_a_write_that_would_eat_into_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path());
        // A reserve beyond what is free: nothing fits.
        let room = DiskRoom::with_reserve(dir.path().to_path_buf(), free + (1 << 30));
        assert!(!room.admit(1));
        // With the usual reserve, a write as large as the free space does
        // not fit either, but small ones still do.
        let room = DiskRoom::new(dir.path().to_path_buf());
        assert!(!room.admit(free as usize));
        assert!(room.admit(1024));
    }

    #[test]
    fn each_admitted_write_is_taken_off_the_estimate() {
        let dir = tempfile::tempdir().unwrap();
        let room = DiskRoom::with_settings(dir.path().to_path_buf(), 0, AN_HOUR);
        assert!(room.admit(1000));
        let after_one = estimate(&room);
        assert!(room.admit(1000));
        assert_eq!(estimate(&room), after_one - 4000);
    }

    #[test]
    fn a_spent_estimate_is_read_again_before_a_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let room = DiskRoom::with_settings(dir.path().to_path_buf(), 0, AN_HOUR);
        assert!(room.admit(1));
        // The estimate says a 1 KiB write would not fit; the disk says it
        // does.
        *room.estimate.lock().unwrap() = Some((Instant::now(), 100));
        assert!(room.admit(1024));
        assert!(estimate(&room) > 100, "the free space was read again");
    }

    #[test]
    fn an_unreadable_dir_does_not_block_writes() {
        let room = DiskRoom::new(PathBuf::from("/nonexistent/tern/data-dir"));
        assert!(room.admit(1024));
    }
}
