//! `tern-appliance`: a primary, a learner with hourly encrypted backups and
//! hourly restore drills, on one machine, on embedded defaults (see
//! [`tern_restore::appliance`]).

use std::process::ExitCode;

use clap::Parser;
use tern_restore::appliance::{self, Settings};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Started by the appliance as one of its members.
    if let Some(outcome) = appliance::member_role() {
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    appliance::main(Settings::parse())
}
