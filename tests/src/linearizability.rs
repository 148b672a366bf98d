//! A linearizability checker for histories of register operations (get,
//! put, compare-and-set) on many keys, in the style of Knossos and
//! Porcupine.
//!
//! # What it decides
//!
//! A history is what concurrent clients saw: for every operation, when it
//! was invoked, when it completed, and its [`Outcome`]. It is linearizable
//! if every operation can be given one instant between its invocation and
//! its completion such that, taken in that order, the operations are what a
//! single register per key would have answered. That is the guarantee etcd
//! (and so Tern) gives for writes and for reads that are not serializable.
//!
//! Outcomes are three-valued, because a distributed client often cannot
//! know what happened:
//!
//! * [`Outcome::Ok`]: acknowledged, with its result. It took effect exactly
//!   once, at some instant inside its interval.
//! * [`Outcome::Failed`]: certainly never applied (refused before it reached
//!   the log). It is left out.
//! * [`Outcome::Unknown`]: a timeout or a lost connection. A write may have
//!   taken effect at any instant *after its invocation*, even long after the
//!   client gave up, or never. A read with an unknown outcome told nothing
//!   and is left out.
//!
//! # How
//!
//! Keys are independent registers, and linearizability is compositional
//! (a history is linearizable iff each key's sub-history is), so each key
//! is checked on its own; that keeps every search small as long as no one
//! key sees thousands of operations (the workload rotates its keys).
//!
//! Per key, the search is Wing and Gong's, with Lowe's memoization as
//! Porcupine uses it: the invocations and completions are one time-ordered
//! list; walking it from the front, an operation whose invocation comes
//! before the first pending completion may be linearized next if the model
//! allows its result, and is then lifted out of the list; reaching a
//! completion means the operation that owns it cannot be put off any
//! longer, so the search backtracks. A (set of linearized operations, model
//! state) pair is explored at most once; that cache is what makes the
//! search practical. An unknown write has no completion in the list, so
//! the search may linearize it anywhere after its invocation, or leave it
//! out: the history is linearizable once every *acknowledged* operation is
//! linearized.
//!
//! # When it is not
//!
//! The report names the key and the operation no order gets past, and
//! prints a minimal counterexample: the history is cut after that
//! operation's completion, then operations are dropped (in chunks, then
//! one at a time) while the rest stays non-linearizable and every value read is still written by
//! an operation kept (so a stale read shrinks to the write it saw, the write
//! that replaced it, and the read, not to a meaningless "read of a value
//! never written").

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

/// A value written to a register. The workload writes each value once, so
/// a value names the operation that wrote it.
pub type Value = u64;

/// The register of one key: absent, or holding a value.
pub type State = Option<Value>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Get,
    Put(Value),
    /// Replace the value with `new` if it is `expect` (`None`: the key is
    /// absent), as one Txn.
    Cas {
        expect: State,
        new: Value,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Read(State),
    Written,
    /// Whether the compare held (and the put was done).
    Swapped(bool),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok(Output),
    /// Certainly not applied.
    Failed,
    /// May or may not have been applied, at any instant after invocation.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// Who ran it (for the report), e.g. `c3@m1`.
    pub client: String,
    pub key: String,
    pub input: Input,
    /// Invocation and completion, from one clock shared by all clients.
    /// For an unknown outcome, `ret` is when the client gave up; the
    /// checker treats it as never.
    pub call: Duration,
    pub ret: Duration,
    pub outcome: Outcome,
    /// Why it failed or is unknown (the gRPC status), for the report.
    pub error: String,
}

impl Operation {
    /// Whether the search must linearize it (acknowledged), may (an unknown
    /// write), or must leave it out (failed, or a read that told nothing).
    fn role(&self) -> Role {
        match (self.outcome, self.input) {
            (Outcome::Ok(_), _) => Role::Definite,
            (Outcome::Unknown, Input::Put(_) | Input::Cas { .. }) => Role::Optional,
            _ => Role::Ignored,
        }
    }

    /// The value this operation writes, if it writes.
    fn writes(&self) -> Option<Value> {
        match self.input {
            Input::Put(v) | Input::Cas { new: v, .. } => Some(v),
            Input::Get => None,
        }
    }

    /// A value this operation saw in the register (so some write of it must
    /// precede it).
    fn observes(&self) -> Option<Value> {
        match (self.input, self.outcome) {
            (Input::Get, Outcome::Ok(Output::Read(v))) => v,
            (Input::Cas { expect, .. }, Outcome::Ok(Output::Swapped(true))) => expect,
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Definite,
    Optional,
    Ignored,
}

/// The sequential specification: the state after `op` runs on `state`, if
/// `op`'s outcome is possible there. An unknown write is only ever
/// linearized as having taken effect: "had no effect" is the same as not
/// linearizing it at all.
pub fn step(state: State, input: Input, outcome: Outcome) -> Option<State> {
    match (input, outcome) {
        (Input::Get, Outcome::Ok(Output::Read(v))) => (v == state).then_some(state),
        (Input::Put(v), Outcome::Ok(Output::Written) | Outcome::Unknown) => Some(Some(v)),
        (Input::Cas { expect, new }, Outcome::Ok(Output::Swapped(true)) | Outcome::Unknown) => {
            (state == expect).then_some(Some(new))
        }
        (Input::Cas { expect, .. }, Outcome::Ok(Output::Swapped(false))) => {
            (state != expect).then_some(state)
        }
        _ => None,
    }
}

/// How many (linearized set, state) pairs one key's search may visit
/// before it gives up and reports the key as inconclusive.
pub const DEFAULT_BUDGET: usize = 2_000_000;

/// The verdict on a whole history.
#[derive(Debug, Default)]
pub struct Report {
    pub keys: usize,
    pub operations: usize,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    /// Operations the search had to place (acknowledged ones and unknown
    /// writes).
    pub checked: usize,
    /// Search states visited, over all keys.
    pub states: usize,
    pub violations: Vec<Violation>,
    /// Keys whose search ran out of budget: neither proven nor refuted.
    pub inconclusive: Vec<String>,
    pub elapsed: Duration,
}

impl Report {
    pub fn is_linearizable(&self) -> bool {
        self.violations.is_empty() && self.inconclusive.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if !self.violations.is_empty() {
            "NOT linearizable"
        } else if !self.inconclusive.is_empty() {
            "inconclusive"
        } else {
            "linearizable"
        };
        writeln!(
            f,
            "{verdict}: {} operations on {} keys ({} ok, {} failed, {} unknown), \
             {} placed by the search in {} states, {} violations, checked in {:.2?}",
            self.operations,
            self.keys,
            self.ok,
            self.failed,
            self.unknown,
            self.checked,
            self.states,
            self.violations.len(),
            self.elapsed
        )?;
        for key in &self.inconclusive {
            writeln!(
                f,
                "key {key}: search budget exhausted (neither proven nor refuted)"
            )?;
        }
        for v in &self.violations {
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

/// One key whose history is not linearizable.
#[derive(Debug, Clone)]
pub struct Violation {
    pub key: String,
    /// The operation no linearization gets past (its completion comes
    /// before any order could place it).
    pub stuck_at: Operation,
    /// How many operations the key had.
    pub of: usize,
    /// A minimal non-linearizable sub-history, by invocation time.
    pub counterexample: Vec<Operation>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "key {}: no order of its {} operations gets past {}",
            self.key,
            self.of,
            describe(&self.stuck_at)
        )?;
        writeln!(
            f,
            "  minimal counterexample ({} operations; the key starts absent):",
            self.counterexample.len()
        )?;
        for op in &self.counterexample {
            writeln!(f, "    {}", describe(op))?;
        }
        Ok(())
    }
}

fn value(v: State) -> String {
    v.map_or("none".to_string(), |v| v.to_string())
}

/// One line per operation: interval, client, what it did, outcome.
pub fn describe(op: &Operation) -> String {
    let what = match op.input {
        Input::Get => "get".to_string(),
        Input::Put(v) => format!("put {v}"),
        Input::Cas { expect, new } => format!("cas {} -> {new}", value(expect)),
    };
    let result = match op.outcome {
        Outcome::Ok(Output::Read(v)) => format!("ok: {}", value(v)),
        Outcome::Ok(Output::Written) => "ok".to_string(),
        Outcome::Ok(Output::Swapped(true)) => "ok: swapped".to_string(),
        Outcome::Ok(Output::Swapped(false)) => "ok: not swapped".to_string(),
        Outcome::Failed => format!("failed ({})", op.error),
        Outcome::Unknown => format!("unknown ({})", op.error),
    };
    let end = match op.outcome {
        Outcome::Unknown => format!("{}?", secs(op.ret)),
        _ => secs(op.ret),
    };
    format!(
        "[{} .. {}] {:<16} {:<12} {}",
        secs(op.call),
        end,
        op.client,
        what,
        result
    )
}

fn secs(d: Duration) -> String {
    format!("+{:.3}s", d.as_secs_f64())
}

/// Check a whole history, key by key, with [`DEFAULT_BUDGET`].
pub fn check(history: &[Operation]) -> Report {
    check_with_budget(history, DEFAULT_BUDGET)
}

pub fn check_with_budget(history: &[Operation], budget: usize) -> Report {
    let started = Instant::now();
    let mut report = Report {
        operations: history.len(),
        ..Report::default()
    };
    let mut keys: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        match op.outcome {
            Outcome::Ok(_) => report.ok += 1,
            Outcome::Failed => report.failed += 1,
            Outcome::Unknown => report.unknown += 1,
        }
        keys.entry(&op.key).or_default().push(op);
    }
    report.keys = keys.len();
    for (key, ops) in keys {
        let placed: Vec<&Operation> = ops
            .iter()
            .copied()
            .filter(|o| o.role() != Role::Ignored)
            .collect();
        report.checked += placed.len();
        let search = search(&placed, budget);
        report.states += search.states;
        match search.verdict {
            Verdict::Linearizable => {}
            Verdict::Budget => report.inconclusive.push(key.to_string()),
            Verdict::Stuck(i) => {
                let counterexample = minimal_counterexample(&placed, i, budget)
                    .into_iter()
                    .cloned()
                    .collect();
                report.violations.push(Violation {
                    key: key.to_string(),
                    stuck_at: placed[i].clone(),
                    of: ops.len(),
                    counterexample,
                });
            }
        }
    }
    report.elapsed = started.elapsed();
    report
}

enum Verdict {
    Linearizable,
    /// Not linearizable: no order gets past the completion of this
    /// operation (the latest such completion any branch reached).
    Stuck(usize),
    Budget,
}

struct Search {
    verdict: Verdict,
    states: usize,
}

/// A fixed-size set of operation indexes.
#[derive(Clone, PartialEq, Eq, Hash)]
struct BitSet(Box<[u64]>);

impl BitSet {
    fn new(n: usize) -> BitSet {
        BitSet(vec![0; n.div_ceil(64)].into_boxed_slice())
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

const NIL: usize = usize::MAX;

/// The time-ordered invocations and completions, as a doubly linked list
/// that operations are lifted out of and put back into in stack order
/// (Knuth's dancing links), so backtracking costs O(1).
struct Events {
    /// Per node (0 is the head): the operation and whether it is the call.
    node: Vec<(usize, bool)>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call: Vec<usize>,
    ret: Vec<usize>,
}

impl Events {
    fn new(ops: &[&Operation]) -> Events {
        let mut entries: Vec<(Duration, bool, usize)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            entries.push((op.call, true, i));
            if op.role() == Role::Definite {
                entries.push((op.ret, false, i));
            }
        }
        // At equal times invocations go first: the operations then overlap,
        // which is the permissive reading of a tie.
        entries.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
        let n = entries.len() + 1;
        let mut e = Events {
            node: vec![(NIL, false); n],
            next: vec![NIL; n],
            prev: vec![NIL; n],
            call: vec![NIL; ops.len()],
            ret: vec![NIL; ops.len()],
        };
        for (k, &(_, is_call, i)) in entries.iter().enumerate() {
            let node = k + 1;
            e.node[node] = (i, is_call);
            e.prev[node] = node - 1;
            e.next[node - 1] = node;
            if is_call {
                e.call[i] = node;
            } else {
                e.ret[i] = node;
            }
        }
        e
    }

    fn first(&self) -> usize {
        self.next[0]
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NIL {
            self.prev[n] = node;
        }
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call[op]);
        if self.ret[op] != NIL {
            self.unlink(self.ret[op]);
        }
    }

    fn unlift(&mut self, op: usize) {
        if self.ret[op] != NIL {
            self.relink(self.ret[op]);
        }
        self.relink(self.call[op]);
    }
}

/// Wing–Gong–Lowe search over one key's operations (none ignored).
fn search(ops: &[&Operation], budget: usize) -> Search {
    let mut events = Events::new(ops);
    let definite = |i: usize| ops[i].role() == Role::Definite;
    let mut remaining = (0..ops.len()).filter(|&i| definite(i)).count();
    let mut linearized = BitSet::new(ops.len());
    let mut state: State = None;
    let mut seen: HashSet<(BitSet, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    // The latest completion any branch was stopped by: (time, operation).
    let mut furthest: Option<(Duration, usize)> = None;
    let mut entry = events.first();
    while remaining > 0 {
        let at_call = entry != NIL && events.node[entry].1;
        if at_call {
            let op = events.node[entry].0;
            if let Some(next) = step(state, ops[op].input, ops[op].outcome) {
                linearized.set(op);
                if seen.insert((linearized.clone(), next)) {
                    if seen.len() > budget {
                        return Search {
                            verdict: Verdict::Budget,
                            states: seen.len(),
                        };
                    }
                    stack.push((op, state));
                    state = next;
                    events.lift(op);
                    if definite(op) {
                        remaining -= 1;
                    }
                    entry = events.first();
                    continue;
                }
                linearized.clear(op);
            }
            entry = events.next[entry];
            continue;
        }
        // A completion: its operation can be put off no longer. (The end of
        // the list cannot be reached while a completion remains, since
        // every call tried lies before the first remaining completion.)
        if entry != NIL {
            let op = events.node[entry].0;
            let t = ops[op].ret;
            if furthest.is_none_or(|(ft, _)| t > ft) {
                furthest = Some((t, op));
            }
        }
        let Some((op, before)) = stack.pop() else {
            let stuck = furthest.map_or(0, |(_, op)| op);
            return Search {
                verdict: Verdict::Stuck(stuck),
                states: seen.len(),
            };
        };
        linearized.clear(op);
        state = before;
        events.unlift(op);
        if definite(op) {
            remaining += 1;
        }
        entry = events.next[events.call[op]];
    }
    Search {
        verdict: Verdict::Linearizable,
        states: seen.len(),
    }
}

fn fails(ops: &[&Operation], budget: usize) -> bool {
    matches!(search(ops, budget).verdict, Verdict::Stuck(_))
}

/// Every value an operation in `ops` observed is still written by an
/// operation in `ops`, if the full history wrote it at all.
fn well_formed(ops: &[&Operation], written_in_full: &HashSet<Value>) -> bool {
    let written: HashSet<Value> = ops.iter().filter_map(|o| o.writes()).collect();
    ops.iter()
        .filter_map(|o| o.observes())
        .all(|v| written.contains(&v) || !written_in_full.contains(&v))
}

/// Cut the history after the stuck operation's completion (nothing invoked
/// later can help place it), then drop operations, in chunks and then one
/// at a time, while the rest still fails and stays well formed.
fn minimal_counterexample<'a>(
    ops: &[&'a Operation],
    stuck: usize,
    budget: usize,
) -> Vec<&'a Operation> {
    // Shrinking runs a search per candidate; keep it cheap.
    const MAX_SHRINK: usize = 400;
    let shrink_budget = budget.min(200_000);
    let cut = ops[stuck].ret;
    let mut window: Vec<&Operation> = ops.iter().copied().filter(|o| o.call <= cut).collect();
    if !fails(&window, shrink_budget) {
        window = ops.to_vec();
    }
    if window.len() > MAX_SHRINK {
        // Too long to shrink: show what led up to the stuck operation.
        let from = window.len() - MAX_SHRINK.min(40);
        let mut tail = window.split_off(from);
        tail.sort_by_key(|o| o.call);
        return tail;
    }
    let written_in_full: HashSet<Value> = ops.iter().filter_map(|o| o.writes()).collect();
    // Delta debugging: drop whole chunks first (most of a long window is
    // irrelevant, and every search after that is short), then halve the
    // chunk down to single operations.
    // Dropping a read can free the write it saw, so single operations are
    // retried until a pass drops nothing.
    let mut chunk = window.len().div_ceil(2).max(1);
    loop {
        let mut dropped = false;
        let mut start = 0;
        while start < window.len() {
            let end = (start + chunk).min(window.len());
            let mut candidate = window[..start].to_vec();
            candidate.extend_from_slice(&window[end..]);
            if well_formed(&candidate, &written_in_full) && fails(&candidate, shrink_budget) {
                window = candidate;
                dropped = true;
            } else {
                start = end;
            }
        }
        if chunk > 1 {
            chunk = chunk.div_ceil(2);
        } else if !dropped {
            break;
        }
    }
    window.sort_by_key(|o| o.call);
    window
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built history: `(client, call ms, ret ms, input, outcome)` on
    /// key `k`.
    fn h(ops: &[(&str, u64, u64, Input, Outcome)]) -> Vec<Operation> {
        ops.iter()
            .map(|&(client, call, ret, input, outcome)| Operation {
                client: client.to_string(),
                key: "k".to_string(),
                input,
                call: Duration::from_millis(call),
                ret: Duration::from_millis(ret),
                outcome,
                error: String::new(),
            })
            .collect()
    }

    use Input::{Cas, Get, Put};
    const W: Outcome = Outcome::Ok(Output::Written);
    const U: Outcome = Outcome::Unknown;
    const F: Outcome = Outcome::Failed;
    fn r(v: Option<Value>) -> Outcome {
        Outcome::Ok(Output::Read(v))
    }
    fn swapped(b: bool) -> Outcome {
        Outcome::Ok(Output::Swapped(b))
    }

    fn linearizable(ops: &[Operation]) -> bool {
        let report = check(ops);
        assert!(report.inconclusive.is_empty(), "{report}");
        report.is_linearizable()
    }

    #[test]
    fn sequential_history_is_accepted() {
        let ops = h(&[
            ("a", 0, 1, Get, r(None)),
            ("a", 2, 3, Put(1), W),
            ("b", 4, 5, Get, r(Some(1))),
            (
                "b",
                6,
                7,
                Cas {
                    expect: Some(1),
                    new: 2,
                },
                swapped(true),
            ),
            (
                "a",
                8,
                9,
                Cas {
                    expect: Some(1),
                    new: 3,
                },
                swapped(false),
            ),
            ("a", 10, 11, Get, r(Some(2))),
        ]);
        assert!(linearizable(&ops));
    }

    #[test]
    fn overlapping_read_may_see_either_value() {
        for seen in [Some(1), Some(2)] {
            let ops = h(&[
                ("a", 0, 1, Put(1), W),
                ("a", 2, 10, Put(2), W),
                ("b", 3, 4, Get, r(seen)),
            ]);
            assert!(linearizable(&ops), "{seen:?}");
        }
        // Two overlapping reads may not disagree in a way no order explains:
        // b sees the new value, then c (starting after b ended) the old one.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("a", 2, 10, Put(2), W),
            ("b", 3, 4, Get, r(Some(2))),
            ("c", 5, 6, Get, r(Some(1))),
        ]);
        assert!(!linearizable(&ops));
    }

    #[test]
    fn stale_read_after_an_acknowledged_write_is_rejected() {
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("b", 0, 1, Get, r(None)),
            ("a", 2, 3, Put(2), W),
            ("c", 2, 3, Get, r(Some(1))),
            ("b", 4, 5, Get, r(Some(1))),
            ("c", 6, 7, Get, r(Some(2))),
        ]);
        let report = check(&ops);
        assert_eq!(report.violations.len(), 1, "{report}");
        let v = &report.violations[0];
        assert_eq!(v.stuck_at.input, Get);
        assert_eq!(v.stuck_at.call, Duration::from_millis(4));
        // The minimal counterexample: the write it saw, the write that
        // replaced it, and the stale read.
        let inputs: Vec<Input> = v.counterexample.iter().map(|o| o.input).collect();
        assert_eq!(inputs, vec![Put(1), Put(2), Get], "{report}");
        assert!(report.to_string().contains("NOT linearizable"), "{report}");
    }

    #[test]
    fn cas_against_a_value_no_longer_current_is_rejected() {
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("a", 2, 3, Put(2), W),
            (
                "b",
                4,
                5,
                Cas {
                    expect: Some(1),
                    new: 3,
                },
                swapped(true),
            ),
        ]);
        assert!(!linearizable(&ops));
        // ... and so is a CAS that failed although its value was current.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            (
                "b",
                2,
                3,
                Cas {
                    expect: Some(1),
                    new: 3,
                },
                swapped(false),
            ),
        ]);
        assert!(!linearizable(&ops));
        // Creating with expect = none fails once the key exists.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            (
                "b",
                2,
                3,
                Cas {
                    expect: None,
                    new: 3,
                },
                swapped(true),
            ),
        ]);
        assert!(!linearizable(&ops));
        let ops = h(&[
            (
                "b",
                0,
                1,
                Cas {
                    expect: None,
                    new: 3,
                },
                swapped(true),
            ),
            ("a", 2, 3, Get, r(Some(3))),
        ]);
        assert!(linearizable(&ops));
    }

    #[test]
    fn read_of_a_value_never_written_is_rejected() {
        let ops = h(&[("a", 0, 1, Put(1), W), ("b", 2, 3, Get, r(Some(9)))]);
        let report = check(&ops);
        assert!(!report.is_linearizable());
        let v = &report.violations[0];
        assert_eq!(v.counterexample.len(), 1, "{report}");
        assert_eq!(v.counterexample[0].outcome, r(Some(9)));
    }

    #[test]
    fn a_read_before_the_write_it_sees_is_rejected() {
        let ops = h(&[("b", 0, 1, Get, r(Some(1))), ("a", 2, 3, Put(1), W)]);
        assert!(!linearizable(&ops));
    }

    #[test]
    fn lost_acknowledged_write_is_rejected() {
        let ops = h(&[("a", 0, 1, Put(1), W), ("b", 2, 3, Get, r(None))]);
        assert!(!linearizable(&ops));
    }

    #[test]
    fn unknown_write_may_take_effect_late_or_never() {
        // Never seen: fine.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("b", 2, 3, Put(2), U),
            ("c", 4, 5, Get, r(Some(1))),
        ]);
        assert!(linearizable(&ops));
        // Seen long after the client gave up on it: fine too.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("b", 2, 3, Put(2), U),
            ("c", 4, 5, Get, r(Some(1))),
            ("c", 100, 101, Get, r(Some(2))),
        ]);
        assert!(linearizable(&ops));
        // But not before it was invoked.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("c", 2, 3, Get, r(Some(2))),
            ("b", 4, 5, Put(2), U),
        ]);
        assert!(!linearizable(&ops));
        // And once seen it cannot un-happen.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("b", 2, 3, Put(2), U),
            ("c", 4, 5, Get, r(Some(2))),
            ("c", 6, 7, Get, r(Some(1))),
        ]);
        assert!(!linearizable(&ops));
    }

    #[test]
    fn unknown_write_explains_a_failed_cas() {
        // Without the unknown write, the CAS must have succeeded.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("b", 2, 3, Put(2), U),
            (
                "c",
                4,
                5,
                Cas {
                    expect: Some(1),
                    new: 3,
                },
                swapped(false),
            ),
        ]);
        assert!(linearizable(&ops));
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            (
                "c",
                4,
                5,
                Cas {
                    expect: Some(1),
                    new: 3,
                },
                swapped(false),
            ),
        ]);
        assert!(!linearizable(&ops));
    }

    #[test]
    fn unknown_cas_takes_effect_only_if_its_compare_held() {
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            (
                "b",
                2,
                3,
                Cas {
                    expect: Some(1),
                    new: 2,
                },
                U,
            ),
            ("c", 4, 5, Get, r(Some(2))),
        ]);
        assert!(linearizable(&ops));
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            (
                "b",
                2,
                3,
                Cas {
                    expect: Some(7),
                    new: 2,
                },
                U,
            ),
            ("c", 4, 5, Get, r(Some(2))),
        ]);
        assert!(!linearizable(&ops));
    }

    #[test]
    fn failed_write_never_happened() {
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("b", 2, 3, Put(2), F),
            ("c", 4, 5, Get, r(Some(2))),
        ]);
        assert!(!linearizable(&ops));
        // Reads that failed or timed out say nothing.
        let ops = h(&[
            ("a", 0, 1, Put(1), W),
            ("b", 2, 3, Get, F),
            ("c", 4, 5, Get, U),
        ]);
        assert!(linearizable(&ops));
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut ops = h(&[("a", 0, 1, Put(1), W), ("a", 2, 3, Get, r(Some(1)))]);
        let mut other = h(&[("b", 0, 1, Put(2), W), ("b", 2, 3, Get, r(None))]);
        for o in &mut other {
            o.key = "other".into();
        }
        ops.extend(other);
        let report = check(&ops);
        assert_eq!(report.keys, 2);
        assert_eq!(report.violations.len(), 1, "{report}");
        assert_eq!(report.violations[0].key, "other");
    }

    /// A tiny deterministic generator for the larger histories below.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Many clients on one key, each operation taking effect at a random
    /// instant inside its interval (so the history is linearizable by
    /// construction), some writes reported unknown and some timed-out
    /// writes never applied.
    fn simulated(clients: usize, ops_per_client: usize, seed: u64) -> Vec<Operation> {
        let mut rng = Lcg(seed);
        let mut planned = Vec::new();
        let mut next_value = 1;
        for c in 0..clients {
            let mut t = rng.below(5);
            for _ in 0..ops_per_client {
                let call = t;
                let ret = call + 1 + rng.below(20);
                let at = call * 1000 + rng.below((ret - call) * 1000);
                let input = match rng.below(3) {
                    0 => Get,
                    1 => {
                        next_value += 1;
                        Put(next_value)
                    }
                    _ => {
                        next_value += 1;
                        Cas {
                            expect: Some((next_value - 1).saturating_sub(rng.below(3))),
                            new: next_value,
                        }
                    }
                };
                let fate = rng.below(20);
                planned.push((at, c, call, ret, input, fate));
                t = ret + rng.below(3);
            }
        }
        planned.sort_by_key(|p| p.0);
        let mut state: State = None;
        let mut ops = Vec::new();
        for (_, c, call, ret, input, fate) in planned {
            let is_write = input != Get;
            // 1 in 20 writes is lost (timed out, never applied).
            let applied = !(is_write && fate == 0);
            let outcome = match input {
                Get => r(state),
                Put(v) => {
                    if applied {
                        state = Some(v);
                    }
                    W
                }
                Cas { expect, new } => {
                    let held = state == expect;
                    if held && applied {
                        state = Some(new);
                    }
                    swapped(held)
                }
            };
            // Lost writes and 1 in 20 more are reported unknown.
            let outcome = if is_write && fate <= 1 { U } else { outcome };
            ops.push(Operation {
                client: format!("c{c}"),
                key: "k".into(),
                input,
                call: Duration::from_millis(call),
                ret: Duration::from_millis(ret),
                outcome,
                error: String::new(),
            });
        }
        ops
    }

    #[test]
    fn large_simulated_histories_are_accepted_quickly() {
        for seed in 0..5 {
            let ops = simulated(8, 60, seed);
            let report = check(&ops);
            assert!(report.is_linearizable(), "seed {seed}: {report}");
            assert!(report.elapsed < Duration::from_secs(5), "{report}");
        }
    }

    #[test]
    fn a_corrupted_simulated_history_is_rejected() {
        let mut ops = simulated(6, 40, 7);
        // The last read of the history now returns a value nobody wrote.
        let last_read = ops.iter().rposition(|o| o.input == Get).expect("some read");
        ops[last_read].outcome = r(Some(999_999));
        let report = check(&ops);
        assert_eq!(report.violations.len(), 1, "{report}");
        assert_eq!(report.violations[0].counterexample.len(), 1, "{report}");
    }

    #[test]
    fn budget_exhaustion_is_inconclusive_not_a_verdict() {
        let ops = simulated(8, 60, 1);
        let report = check_with_budget(&ops, 10);
        assert!(!report.is_linearizable());
        assert!(report.violations.is_empty());
        assert_eq!(report.inconclusive, vec!["k".to_string()]);
    }
}
