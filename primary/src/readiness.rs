//! Start-up and shutdown as systemd sees them (`Type=notify`): `READY=1`
//! once the member serves clients, `STOPPING=1` when it begins to stop, and
//! `STATUS=` lines on the way, shown by `systemctl status`.
//!
//! "Serving" means what a client would call it: the client listeners
//! answer requests and this member is in the replicated member list (a
//! member publishes itself through Raft before it answers, like etcd), so
//! a unit ordered `After=` a Tern unit starts against a working member.
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use sd_notify::NotifyState;

/// A `STATUS=` line; failures are logged, never fatal (a member serves
/// whether or not systemd hears about it).
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// `READY=1`, with a status line saying what is served.
pub fn ready(text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// `STOPPING=1`: the member stops serving.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}
