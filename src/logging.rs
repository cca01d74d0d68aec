//! Log output: human-readable lines or JSON objects on stderr, filtered by
//! `CHANGETOKEN_LOG` (an `EnvFilter` directive such as `debug` or
//! `changetoken=debug,h2=warn`).

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

/// The environment variable holding the log filter.
pub const FILTER_ENV: &str = "CHANGETOKEN_LOG";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs the global subscriber. `default` is the filter used when
/// `CHANGETOKEN_LOG` is unset or invalid.
pub fn init(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new(default));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
