//! The `changetoken` binary: see `changetoken --help`.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    changetoken::cli::Cli::parse().run()
}
