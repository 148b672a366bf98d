//! Which backups to keep: keep-last N, keep-within a duration, and tiered
//! hourly/daily/weekly/monthly buckets; the newest verified backup is never deleted.
//!
//! This module is pure: it performs no I/O and never reads the clock. The
//! caller lists the backups it found in object storage as [`Candidate`]s,
//! passes the current time, and gets back a [`Decision`] saying which backups
//! to keep (and why) and which to delete. The policies follow restic's
//! `forget` command.
//!
//! # Semantics
//!
//! * **Order.** Backups are sorted newest first by [`Candidate::time`]; backups
//!   with the same time are ordered by [`Candidate::id`] descending (so the
//!   larger id counts as the newer one). The input order never matters: the
//!   same set of candidates always gives the same [`Decision`].
//! * **Empty policy.** If no `keep_*` option is set ([`Policy::is_empty`]),
//!   every backup is kept with [`Reason::NoPolicy`] and nothing is deleted.
//! * **`keep_last: Some(n)`** keeps the `n` newest backups ([`Reason::Last`]).
//! * **`keep_within: Some(d)`** keeps every backup with `now - time <= d`
//!   ([`Reason::Within`]). The boundary is inclusive. A backup whose time is
//!   after `now` (clock skew) has a negative age and is therefore kept. A
//!   duration too large for chrono to represent keeps everything.
//! * **Tiered buckets** (`keep_hourly`, `keep_daily`, `keep_weekly`,
//!   `keep_monthly`), as in restic: walking the backups newest to oldest, the
//!   first (that is, newest) backup of each distinct bucket is kept, until `n`
//!   buckets have been kept; older buckets are then ignored by that tier. Each
//!   tier counts on its own. The buckets are computed in UTC:
//!   * hourly ([`Reason::Hourly`]): the hour, `%Y-%m-%d %H`;
//!   * daily ([`Reason::Daily`]): the date, `%Y-%m-%d`;
//!   * weekly ([`Reason::Weekly`]): the ISO 8601 week, i.e.
//!     `(iso_week().year(), iso_week().week())`, so 31 December and the
//!     following 2 January can share a week, and weeks start on Monday;
//!   * monthly ([`Reason::Monthly`]): `(year, month)`.
//!
//!   Buckets with no backup do not count: `keep_daily: Some(7)` keeps the
//!   newest backup of each of the 7 most recent days *that have backups*,
//!   however far apart those days are.
//! * **Union.** The options add up: a backup is kept if any option keeps it,
//!   and a backup kept for several reasons lists all of them, in the order the
//!   [`Reason`] variants are declared (`Last`, `Within`, `Hourly`, `Daily`,
//!   `Weekly`, `Monthly`, `NewestVerified`, `NoPolicy`).
//! * **Newest verified.** The newest backup with `verified == true` is always
//!   kept, even when the policy would delete it, and its reasons always
//!   include [`Reason::NewestVerified`] (with any policy, including an empty
//!   one). If no backup is verified, no backup gets this reason.
//! * **Unverified backups** (whose manifest could not be read or validated)
//!   follow the same rules as the others: they occupy `keep_last` slots and
//!   buckets, and can be kept or deleted. They are only never the "newest
//!   verified" backup.
//! * **Zero counts.** `Some(0)` counts as *set*: the policy is not empty, but
//!   that option keeps nothing. A policy such as `keep_last: Some(0)` alone
//!   therefore deletes everything except the newest verified backup.
//!   Configuration that should not allow this must reject zeros itself.
//! * **Output.** [`Decision::keep`] and [`Decision::delete`] are both ordered
//!   newest first, and every candidate appears in exactly one of them. Ids are
//!   expected to be unique; duplicate ids are treated as distinct backups.

use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use std::time::Duration;

/// A retention policy: which backups to keep. Every option that is set adds
/// backups to the kept set (see the [module documentation](self)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the N newest backups.
    pub keep_last: Option<u32>,
    /// Keep every backup taken at most this long before `now` (inclusive).
    pub keep_within: Option<Duration>,
    /// Keep the newest backup of each of the N newest UTC hours that have one.
    pub keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the N newest UTC days that have one.
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the N newest ISO weeks that have one.
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the N newest UTC months that have one.
    pub keep_monthly: Option<u32>,
}

/// A backup found in storage, as seen by the retention policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Backup id (sortable, but backups are ordered by `time`; the id only
    /// breaks ties).
    pub id: String,
    /// When the backup was taken (manifest end time).
    pub time: DateTime<Utc>,
    /// False if its manifest could not be read or validated.
    pub verified: bool,
}

/// The outcome of [`Policy::apply`]. Every candidate is in exactly one list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Backups to keep, newest first, each with every reason it is kept for
    /// (never empty, in [`Reason`] declaration order).
    pub keep: Vec<(String, Vec<Reason>)>,
    /// Ids of backups to delete, newest first.
    pub delete: Vec<String>,
}

/// Why a backup is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Among the `keep_last` newest backups.
    Last,
    /// Taken within `keep_within` of `now`.
    Within,
    /// Newest backup of one of the `keep_hourly` newest hours.
    Hourly,
    /// Newest backup of one of the `keep_daily` newest days.
    Daily,
    /// Newest backup of one of the `keep_weekly` newest ISO weeks.
    Weekly,
    /// Newest backup of one of the `keep_monthly` newest months.
    Monthly,
    /// The newest backup whose manifest is verified; never deleted.
    NewestVerified,
    /// The policy is empty, so every backup is kept.
    NoPolicy,
}

/// A bucket tier and the key of the bucket a time falls in.
#[derive(Debug, Clone, Copy)]
enum Tier {
    Hourly,
    Daily,
    Weekly,
    Monthly,
}

impl Tier {
    /// The bucket of `time` in this tier, as a comparable key (UTC).
    fn bucket(self, time: &DateTime<Utc>) -> (i32, u32, u32) {
        match self {
            Tier::Hourly => (time.year(), time.ordinal(), time.hour()),
            Tier::Daily => (time.year(), time.ordinal(), 0),
            Tier::Weekly => {
                let week = time.iso_week();
                (week.year(), week.week(), 0)
            }
            Tier::Monthly => (time.year(), time.month(), 0),
        }
    }

    fn reason(self) -> Reason {
        match self {
            Tier::Hourly => Reason::Hourly,
            Tier::Daily => Reason::Daily,
            Tier::Weekly => Reason::Weekly,
            Tier::Monthly => Reason::Monthly,
        }
    }
}

impl Policy {
    /// True when no keep-* option is set: then nothing is ever deleted.
    ///
    /// An option set to zero (`Some(0)`, or a zero `keep_within`) counts as
    /// set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_within.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
    }

    /// Decide, at `now`, which of `backups` to keep. Deterministic and pure
    /// (the clock is a parameter, so tests control it).
    ///
    /// See the [module documentation](self) for the rules.
    #[must_use]
    pub fn apply(&self, backups: &[Candidate], now: DateTime<Utc>) -> Decision {
        let mut sorted: Vec<&Candidate> = backups.iter().collect();
        sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));

        // Reasons per backup, in `sorted` order. Each rule runs over all
        // backups in turn, in `Reason` declaration order, so every list ends
        // up in that order.
        let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); sorted.len()];

        if let Some(n) = self.keep_last {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            for r in reasons.iter_mut().take(n) {
                r.push(Reason::Last);
            }
        }

        if let Some(within) = self.keep_within {
            // A duration beyond chrono's range (about 292 million years)
            // keeps everything.
            let within = TimeDelta::from_std(within).ok();
            for (backup, r) in sorted.iter().zip(reasons.iter_mut()) {
                let kept = within.is_none_or(|w| now.signed_duration_since(backup.time) <= w);
                if kept {
                    r.push(Reason::Within);
                }
            }
        }

        for (tier, count) in [
            (Tier::Hourly, self.keep_hourly),
            (Tier::Daily, self.keep_daily),
            (Tier::Weekly, self.keep_weekly),
            (Tier::Monthly, self.keep_monthly),
        ] {
            let Some(mut remaining) = count else { continue };
            // Backups are sorted, so each bucket's backups are contiguous and
            // its newest one comes first.
            let mut last_bucket = None;
            for (backup, r) in sorted.iter().zip(reasons.iter_mut()) {
                if remaining == 0 {
                    break;
                }
                let bucket = tier.bucket(&backup.time);
                if last_bucket != Some(bucket) {
                    last_bucket = Some(bucket);
                    r.push(tier.reason());
                    remaining -= 1;
                }
            }
        }

        if let Some(i) = sorted.iter().position(|b| b.verified) {
            reasons[i].push(Reason::NewestVerified);
        }

        if self.is_empty() {
            for r in &mut reasons {
                r.push(Reason::NoPolicy);
            }
        }

        let mut keep = Vec::new();
        let mut delete = Vec::new();
        for (backup, r) in sorted.into_iter().zip(reasons) {
            if r.is_empty() {
                delete.push(backup.id.clone());
            } else {
                keep.push((backup.id.clone(), r));
            }
        }
        Decision { keep, delete }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Reason::*;

    /// The fixed clock used by every test.
    fn now() -> DateTime<Utc> {
        at("2026-03-15T12:00:00Z")
    }

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339)
            .expect("valid RFC 3339 time")
            .with_timezone(&Utc)
    }

    fn verified(id: &str, time: &str) -> Candidate {
        Candidate {
            id: id.to_owned(),
            time: at(time),
            verified: true,
        }
    }

    fn unverified(id: &str, time: &str) -> Candidate {
        Candidate {
            verified: false,
            ..verified(id, time)
        }
    }

    fn kept_ids(d: &Decision) -> Vec<&str> {
        d.keep.iter().map(|(id, _)| id.as_str()).collect()
    }

    fn deleted_ids(d: &Decision) -> Vec<&str> {
        d.delete.iter().map(String::as_str).collect()
    }

    fn reasons<'a>(d: &'a Decision, id: &str) -> &'a [Reason] {
        d.keep
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, r)| r.as_slice())
            .unwrap_or_else(|| panic!("{id} is not kept: {d:?}"))
    }

    /// Every input id appears exactly once in the decision.
    fn assert_partition(backups: &[Candidate], d: &Decision) {
        let mut all: Vec<&str> = kept_ids(d).into_iter().chain(deleted_ids(d)).collect();
        all.sort_unstable();
        let mut input: Vec<&str> = backups.iter().map(|b| b.id.as_str()).collect();
        input.sort_unstable();
        assert_eq!(all, input, "keep + delete must partition the input");
        assert!(d.keep.iter().all(|(_, r)| !r.is_empty()));
    }

    /// Five daily backups, given oldest first (the input order must not matter).
    fn five_days() -> Vec<Candidate> {
        vec![
            verified("b1", "2026-03-11T01:00:00Z"),
            verified("b2", "2026-03-12T01:00:00Z"),
            verified("b3", "2026-03-13T01:00:00Z"),
            verified("b4", "2026-03-14T01:00:00Z"),
            verified("b5", "2026-03-15T01:00:00Z"),
        ]
    }

    #[test]
    fn keep_last_3_of_5_keeps_the_three_newest_and_deletes_the_two_oldest() {
        let backups = five_days();
        let policy = Policy {
            keep_last: Some(3),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                ("b5".to_owned(), vec![Last, NewestVerified]),
                ("b4".to_owned(), vec![Last]),
                ("b3".to_owned(), vec![Last]),
            ]
        );
        assert_eq!(deleted_ids(&d), ["b2", "b1"]);
    }

    #[test]
    fn keep_last_larger_than_the_number_of_backups_keeps_all_of_them() {
        let backups = five_days();
        let policy = Policy {
            keep_last: Some(10),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_eq!(kept_ids(&d), ["b5", "b4", "b3", "b2", "b1"]);
        assert!(d.delete.is_empty());
    }

    #[test]
    fn keep_within_24h_keeps_a_backup_exactly_24h_old_and_deletes_one_a_second_older() {
        let backups = vec![
            verified("fresh", "2026-03-15T11:59:59Z"),
            verified("exactly-24h", "2026-03-14T12:00:00Z"),
            verified("24h-and-1s", "2026-03-14T11:59:59Z"),
            verified("old", "2026-03-01T00:00:00Z"),
        ];
        let policy = Policy {
            keep_within: Some(Duration::from_secs(24 * 3600)),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                ("fresh".to_owned(), vec![Within, NewestVerified]),
                ("exactly-24h".to_owned(), vec![Within]),
            ]
        );
        assert_eq!(deleted_ids(&d), ["24h-and-1s", "old"]);
    }

    #[test]
    fn keep_within_keeps_backups_dated_after_now_and_a_huge_duration_keeps_everything() {
        let backups = vec![
            verified("future", "2026-03-15T13:00:00Z"),
            verified("ancient", "1990-01-01T00:00:00Z"),
        ];
        let one_hour = Policy {
            keep_within: Some(Duration::from_secs(3600)),
            ..Policy::default()
        };
        let d = one_hour.apply(&backups, now());
        assert_eq!(kept_ids(&d), ["future"]);
        assert_eq!(deleted_ids(&d), ["ancient"]);

        let forever = Policy {
            keep_within: Some(Duration::MAX),
            ..Policy::default()
        };
        let d = forever.apply(&backups, now());
        assert_eq!(reasons(&d, "ancient"), [Within]);
        assert!(d.delete.is_empty());
    }

    #[test]
    fn keep_hourly_3_with_several_backups_per_hour_keeps_the_newest_of_each_of_the_3_newest_hours()
    {
        let backups = vec![
            verified("h11-a", "2026-03-15T11:05:00Z"),
            verified("h11-b", "2026-03-15T11:35:00Z"),
            verified("h11-c", "2026-03-15T11:59:59Z"),
            verified("h10-a", "2026-03-15T10:00:00Z"),
            verified("h10-b", "2026-03-15T10:30:00Z"),
            // No backup at 09:xx: empty hours do not use up a bucket.
            verified("h08-a", "2026-03-15T08:10:00Z"),
            verified("h08-b", "2026-03-15T08:50:00Z"),
            verified("h07-a", "2026-03-15T07:45:00Z"),
        ];
        let policy = Policy {
            keep_hourly: Some(3),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                ("h11-c".to_owned(), vec![Hourly, NewestVerified]),
                ("h10-b".to_owned(), vec![Hourly]),
                ("h08-b".to_owned(), vec![Hourly]),
            ]
        );
        assert_eq!(
            deleted_ids(&d),
            ["h11-b", "h11-a", "h10-a", "h08-a", "h07-a"]
        );
    }

    #[test]
    fn keep_hourly_treats_the_same_hour_on_different_days_as_different_buckets() {
        let backups = vec![
            verified("today-10h", "2026-03-15T10:00:00Z"),
            verified("yesterday-10h", "2026-03-14T10:00:00Z"),
        ];
        let policy = Policy {
            keep_hourly: Some(2),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_eq!(kept_ids(&d), ["today-10h", "yesterday-10h"]);
    }

    #[test]
    fn keep_daily_3_across_the_february_march_boundary_keeps_the_last_backup_of_each_utc_day() {
        let backups = vec![
            verified("mar02-early", "2026-03-02T00:00:00Z"),
            verified("mar01-late", "2026-03-01T23:59:59Z"),
            verified("mar01-early", "2026-03-01T00:00:01Z"),
            verified("feb28-late", "2026-02-28T23:59:59Z"),
            verified("feb28-early", "2026-02-28T06:00:00Z"),
            verified("feb27", "2026-02-27T12:00:00Z"),
        ];
        let policy = Policy {
            keep_daily: Some(3),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                ("mar02-early".to_owned(), vec![Daily, NewestVerified]),
                ("mar01-late".to_owned(), vec![Daily]),
                ("feb28-late".to_owned(), vec![Daily]),
            ]
        );
        assert_eq!(deleted_ids(&d), ["mar01-early", "feb28-early", "feb27"]);
    }

    #[test]
    fn keep_weekly_3_across_the_2025_2026_boundary_groups_by_iso_week() {
        // ISO week 2026-W01 runs from Monday 2025-12-29 to Sunday 2026-01-04,
        // so 29 and 31 December share a week with 2 January.
        let backups = vec![
            verified("w02-mon-jan05", "2026-01-05T09:00:00Z"),
            verified("w01-fri-jan02", "2026-01-02T09:00:00Z"),
            verified("w01-wed-dec31", "2025-12-31T09:00:00Z"),
            verified("w01-mon-dec29", "2025-12-29T09:00:00Z"),
            verified("w52-sun-dec28", "2025-12-28T09:00:00Z"),
            verified("w51-sun-dec21", "2025-12-21T09:00:00Z"),
        ];
        let policy = Policy {
            keep_weekly: Some(3),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                ("w02-mon-jan05".to_owned(), vec![Weekly, NewestVerified]),
                ("w01-fri-jan02".to_owned(), vec![Weekly]),
                ("w52-sun-dec28".to_owned(), vec![Weekly]),
            ]
        );
        assert_eq!(
            deleted_ids(&d),
            ["w01-wed-dec31", "w01-mon-dec29", "w51-sun-dec21"]
        );
    }

    #[test]
    fn keep_weekly_treats_iso_week_53_spanning_new_year_as_one_bucket() {
        // 2020-12-31 (Thursday) and 2021-01-03 (Sunday) are both in 2020-W53;
        // Monday 2021-01-04 starts 2021-W01.
        let backups = vec![
            verified("w2021-01-mon", "2021-01-04T00:00:00Z"),
            verified("w2020-53-sun", "2021-01-03T23:00:00Z"),
            verified("w2020-53-thu", "2020-12-31T23:00:00Z"),
            verified("w2020-52-sun", "2020-12-27T23:00:00Z"),
        ];
        let policy = Policy {
            keep_weekly: Some(2),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_eq!(kept_ids(&d), ["w2021-01-mon", "w2020-53-sun"]);
        assert_eq!(deleted_ids(&d), ["w2020-53-thu", "w2020-52-sun"]);
    }

    #[test]
    fn keep_monthly_3_across_a_year_boundary_keeps_the_last_backup_of_each_month() {
        let backups = vec![
            verified("2026-02-late", "2026-02-20T00:00:00Z"),
            verified("2026-02-early", "2026-02-01T00:00:00Z"),
            verified("2026-01-end", "2026-01-31T23:59:59Z"),
            verified("2026-01-mid", "2026-01-15T00:00:00Z"),
            // No backup in November: empty months do not use up a bucket.
            verified("2025-12-end", "2025-12-31T23:59:59Z"),
            verified("2025-12-start", "2025-12-01T00:00:00Z"),
            verified("2025-10", "2025-10-10T00:00:00Z"),
        ];
        let policy = Policy {
            keep_monthly: Some(3),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                ("2026-02-late".to_owned(), vec![Monthly, NewestVerified]),
                ("2026-01-end".to_owned(), vec![Monthly]),
                ("2025-12-end".to_owned(), vec![Monthly]),
            ]
        );
        assert_eq!(
            deleted_ids(&d),
            ["2026-02-early", "2026-01-mid", "2025-12-start", "2025-10"]
        );
    }

    #[test]
    fn combined_last_within_daily_weekly_monthly_keeps_the_union_and_lists_every_reason() {
        let backups = vec![
            verified("mar15-11h", "2026-03-15T11:00:00Z"), // Sunday, 2026-W11
            verified("mar15-06h", "2026-03-15T06:00:00Z"),
            verified("mar14-23h", "2026-03-14T23:00:00Z"),
            verified("mar14-01h", "2026-03-14T01:00:00Z"),
            verified("mar09", "2026-03-09T12:00:00Z"), // Monday, 2026-W11
            verified("mar08", "2026-03-08T12:00:00Z"), // Sunday, 2026-W10
            verified("feb28", "2026-02-28T12:00:00Z"),
            verified("feb01", "2026-02-01T12:00:00Z"),
            verified("jan31", "2026-01-31T12:00:00Z"),
        ];
        let policy = Policy {
            keep_last: Some(2),
            keep_within: Some(Duration::from_secs(12 * 3600)), // back to mar15 00:00
            keep_hourly: None,
            keep_daily: Some(3),
            keep_weekly: Some(2),
            keep_monthly: Some(2),
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                (
                    "mar15-11h".to_owned(),
                    vec![Last, Within, Daily, Weekly, Monthly, NewestVerified]
                ),
                ("mar15-06h".to_owned(), vec![Last, Within]),
                ("mar14-23h".to_owned(), vec![Daily]),
                ("mar09".to_owned(), vec![Daily]),
                ("mar08".to_owned(), vec![Weekly]),
                ("feb28".to_owned(), vec![Monthly]),
            ]
        );
        assert_eq!(deleted_ids(&d), ["mar14-01h", "feb01", "jan31"]);
    }

    #[test]
    fn empty_policy_keeps_every_backup_for_no_policy_and_deletes_nothing() {
        let policy = Policy::default();
        assert!(policy.is_empty());

        let backups = vec![
            unverified("newest-unverified", "2026-03-15T10:00:00Z"),
            verified("verified", "2026-03-10T10:00:00Z"),
            verified("old", "2020-01-01T00:00:00Z"),
        ];
        let d = policy.apply(&backups, now());
        assert_eq!(
            d.keep,
            vec![
                ("newest-unverified".to_owned(), vec![NoPolicy]),
                ("verified".to_owned(), vec![NewestVerified, NoPolicy]),
                ("old".to_owned(), vec![NoPolicy]),
            ]
        );
        assert!(d.delete.is_empty());
    }

    #[test]
    fn any_single_option_makes_the_policy_non_empty_even_when_zero() {
        let set = [
            Policy {
                keep_last: Some(0),
                ..Policy::default()
            },
            Policy {
                keep_within: Some(Duration::ZERO),
                ..Policy::default()
            },
            Policy {
                keep_hourly: Some(0),
                ..Policy::default()
            },
            Policy {
                keep_daily: Some(0),
                ..Policy::default()
            },
            Policy {
                keep_weekly: Some(0),
                ..Policy::default()
            },
            Policy {
                keep_monthly: Some(0),
                ..Policy::default()
            },
        ];
        for policy in set {
            assert!(!policy.is_empty(), "{policy:?}");
        }
    }

    #[test]
    fn keep_last_zero_deletes_everything_except_the_newest_verified() {
        let backups = five_days();
        let policy = Policy {
            keep_last: Some(0),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_eq!(d.keep, vec![("b5".to_owned(), vec![NewestVerified])]);
        assert_eq!(deleted_ids(&d), ["b4", "b3", "b2", "b1"]);
    }

    #[test]
    fn unverified_newest_with_keep_last_1_also_keeps_the_older_verified_one_for_newest_verified() {
        let backups = vec![
            verified("oldest-verified", "2026-03-13T00:00:00Z"),
            verified("older-verified", "2026-03-14T00:00:00Z"),
            unverified("newest-unverified", "2026-03-15T00:00:00Z"),
        ];
        let policy = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                ("newest-unverified".to_owned(), vec![Last]),
                ("older-verified".to_owned(), vec![NewestVerified]),
            ]
        );
        assert_eq!(deleted_ids(&d), ["oldest-verified"]);
    }

    #[test]
    fn unverified_backups_outside_the_policy_are_deleted_and_never_count_as_newest_verified() {
        let backups = vec![
            unverified("u3", "2026-03-15T00:00:00Z"),
            unverified("u2", "2026-03-14T00:00:00Z"),
            verified("v1", "2026-01-01T00:00:00Z"),
            unverified("u0", "2025-12-01T00:00:00Z"),
        ];
        let policy = Policy {
            keep_within: Some(Duration::from_secs(24 * 3600)),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_eq!(
            d.keep,
            vec![
                ("u3".to_owned(), vec![Within]),
                ("v1".to_owned(), vec![NewestVerified]),
            ]
        );
        assert_eq!(deleted_ids(&d), ["u2", "u0"]);
    }

    #[test]
    fn no_verified_backup_at_all_gives_no_newest_verified_and_follows_the_policy() {
        let backups = vec![
            unverified("u2", "2026-03-15T00:00:00Z"),
            unverified("u1", "2026-03-14T00:00:00Z"),
        ];
        let policy = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_eq!(d.keep, vec![("u2".to_owned(), vec![Last])]);
        assert_eq!(deleted_ids(&d), ["u1"]);
    }

    #[test]
    fn duplicate_times_are_ordered_by_id_descending_whatever_the_input_order() {
        let backups = vec![
            verified("id-a", "2026-03-15T10:00:00Z"),
            verified("id-c", "2026-03-15T10:00:00Z"),
            verified("id-b", "2026-03-15T10:00:00Z"),
            verified("id-older", "2026-03-15T09:00:00Z"),
        ];
        let policy = Policy {
            keep_last: Some(1),
            keep_hourly: Some(2),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_partition(&backups, &d);
        assert_eq!(
            d.keep,
            vec![
                ("id-c".to_owned(), vec![Last, Hourly, NewestVerified]),
                ("id-older".to_owned(), vec![Hourly]),
            ]
        );
        assert_eq!(deleted_ids(&d), ["id-b", "id-a"]);

        let mut reversed = backups.clone();
        reversed.reverse();
        assert_eq!(policy.apply(&reversed, now()), d);
    }

    #[test]
    fn duplicate_times_with_only_the_lower_id_verified_keep_it_as_newest_verified() {
        let backups = vec![
            verified("id-a", "2026-03-15T10:00:00Z"),
            unverified("id-b", "2026-03-15T10:00:00Z"),
        ];
        let policy = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let d = policy.apply(&backups, now());
        assert_eq!(
            d.keep,
            vec![
                ("id-b".to_owned(), vec![Last]),
                ("id-a".to_owned(), vec![NewestVerified]),
            ]
        );
        assert!(d.delete.is_empty());
    }

    #[test]
    fn no_backups_gives_an_empty_decision() {
        let policy = Policy {
            keep_last: Some(3),
            ..Policy::default()
        };
        let d = policy.apply(&[], now());
        assert!(d.keep.is_empty());
        assert!(d.delete.is_empty());
    }
}
