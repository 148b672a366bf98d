//! Progress bars on stderr, hidden for `--json` output.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-count progress bar on stderr; hidden for `--json` and when
/// stderr is not a terminal.
pub fn bytes_bar(json: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, draw_target(json));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar
}

pub fn count_bar(json: bool, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, draw_target(json));
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

fn draw_target(json: bool) -> ProgressDrawTarget {
    if json {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}
