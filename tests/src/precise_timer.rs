//! A sleep that wakes within microseconds of its deadline.
//!
//! tokio's timer wheel counts whole milliseconds and rounds every deadline
//! up to the next one, so `tokio::time::sleep_until` wakes 0–1 ms late (and
//! later still when the runtime parks with a millisecond `epoll_wait`
//! timeout). For the proxy's delays that error is part of the delay a test
//! or the bench measures: a 50 ms one-way link would be 50.0–51.x ms. A
//! `timerfd` wakes the same runtime at the deadline itself.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

/// One re-armable one-shot timer, registered with the current runtime.
pub(crate) struct PreciseTimer {
    fd: AsyncFd<OwnedFd>,
}

impl PreciseTimer {
    /// Must be called inside a tokio runtime with its IO driver enabled.
    pub(crate) fn new() -> io::Result<PreciseTimer> {
        // SAFETY: plain syscall; the returned descriptor is checked and then
        // owned by the `OwnedFd`.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the `OwnedFd` keeps the descriptor open, and always the
        // same one, until the `AsyncFd` that owns it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(PreciseTimer { fd })
    }

    /// Returns at `deadline` or just after it. Cancel-safe: a sleep dropped
    /// half way leaves the timer armed, and its stale expiry is ignored by
    /// the next sleep, which re-arms and checks the clock itself.
    pub(crate) async fn sleep_until(&self, deadline: Instant) -> io::Result<()> {
        loop {
            let now = Instant::now();
            if deadline <= now {
                return Ok(());
            }
            self.arm(deadline - now)?;
            let mut ready = self.fd.readable().await?;
            // Drain the expiry count so the descriptor reads as not ready
            // again; `WouldBlock` means the readiness was stale.
            let _ = ready.try_io(|fd| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a buffer of 8.
                let n = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        }
    }

    fn arm(&self, after: std::time::Duration) -> io::Result<()> {
        // A zero `it_value` would disarm the timer instead of firing it.
        let after = after.max(std::time::Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec and the old value is not
        // asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Judged against the kernel's own timer on this machine: on a VM every
    /// wake is late by a varying 100–350 µs (a plain `thread::sleep` too),
    /// which is not this timer's error. tokio's would be late by that plus
    /// 0–1 ms of rounding, about 500 µs more at the median.
    #[tokio::test]
    async fn wakes_at_the_deadline_not_the_next_millisecond() {
        let timer = PreciseTimer::new().unwrap();
        let (mut ours, mut kernel) = (Vec::new(), Vec::new());
        for i in 0..51u64 {
            // Off the millisecond grid, where tokio rounds up.
            let nap = Duration::from_micros(1_300 + 37 * i);
            let deadline = Instant::now() + nap;
            timer.sleep_until(deadline).await.unwrap();
            let now = Instant::now();
            assert!(now >= deadline, "woke early");
            ours.push(now - deadline);
            let started = Instant::now();
            std::thread::sleep(nap);
            kernel.push(started.elapsed() - nap);
        }
        ours.sort();
        kernel.sort();
        let (late, machine) = (ours[25], kernel[25]);
        assert!(
            late < machine + Duration::from_micros(250),
            "median wake {late:?} late, a thread's sleep {machine:?} \
             (ours: {ours:?}; thread::sleep: {kernel:?})"
        );
    }

    #[tokio::test]
    async fn a_cancelled_sleep_does_not_cut_the_next_one_short() {
        let timer = PreciseTimer::new().unwrap();
        let short = Instant::now() + Duration::from_millis(2);
        // Drop a sleep before its deadline, leaving the timer armed.
        let _ = tokio::time::timeout(Duration::from_micros(200), timer.sleep_until(short)).await;
        // Let the stale expiry happen, then sleep for longer.
        std::thread::sleep(Duration::from_millis(3));
        let deadline = Instant::now() + Duration::from_millis(5);
        timer.sleep_until(deadline).await.unwrap();
        assert!(Instant::now() >= deadline);
    }
}
