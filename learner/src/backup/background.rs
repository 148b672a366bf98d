//! A backup's heavy work (reading and hashing the state, zstd, age) on a
//! thread of its own that runs only when a core is otherwise idle.
//!
//! A full backup of 1 M keys keeps a core busy for a second or more. At
//! normal priority it competed with the learner's apply, its clients and
//! the primary beside it for the two cores, and the learner's lag p99 went
//! from 2.8 ms to 6.4–6.9 ms while it ran; at nice +10 to 4.7–5.3, at +19
//! to 3.9–4.5. Under Linux's `SCHED_IDLE` policy the backup takes only
//! what nothing else wants: 3.6–4.0 ms against 2.8–3.6 without a backup,
//! and the backup itself no slower (1.5–1.6 s of 1.36 GB; the cores are
//! mostly free at that load). On a learner whose cores are saturated the
//! backup still progresses, slowly (the kernel gives an idle-class thread
//! a small share rather than none); the "no backup for 2 h" alert is the
//! signal then.

use std::future::Future;

/// Run `work` on a new thread named `name` under `SCHED_IDLE`; its result,
/// or an error if the thread could not start or panicked.
pub fn run<T: Send + 'static>(
    name: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = Result<T, String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            run_when_idle();
            let _ = tx.send(work());
        });
    async move {
        started.map_err(|e| format!("cannot start the {name} thread: {e}"))?;
        rx.await.map_err(|_| format!("the {name} thread panicked"))
    }
}

/// Put the calling thread (only it: on Linux the policy is per thread) in
/// the idle scheduling class. Best effort: a backup at normal priority is
/// harder on the learner, not wrong.
fn run_when_idle() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(2) on the calling thread (pid 0) with a
    // valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot move the backup thread to SCHED_IDLE"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_of_this_thread() -> i32 {
        // SAFETY: sched_getscheduler(2) on the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[tokio::test]
    async fn work_runs_when_idle_and_returns_its_result() {
        let (policy, name) = run("backup-test", || {
            (
                policy_of_this_thread(),
                std::thread::current().name().map(str::to_owned),
            )
        })
        .await
        .unwrap();
        assert_eq!(policy, libc::SCHED_IDLE);
        assert_eq!(name.as_deref(), Some("backup-test"));
        // The caller's own policy is untouched.
        assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER);
    }

    #[tokio::test]
    async fn a_panic_is_an_error_not_a_hang() {
        let err = run("backup-test", || -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(err.contains("panicked"), "{err}");
    }
}
