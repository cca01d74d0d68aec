//! The benchmark driver: runs every workload with its anchor in the same run,
//! alternating, and prints a table of medians and ratios.
//!
//! `bench [WORKLOAD...]` where WORKLOAD is reads, writes, watch, propagation,
//! growth (default: all). scripts/bench installs the tools and builds first.

mod growth;
mod propagation;
mod reads;
mod util;
mod watch;
mod writes;

fn main() {
    // The load generator runs on the server's runtime (no LIFO slot), for
    // every system it drives alike.
    let runtime = changetoken::cli::runtime().expect("tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all = args.is_empty();
    let want = |name: &str| all || args.iter().any(|a| a == name);
    let mut rows = Vec::new();
    if want("reads") {
        rows.extend(reads::run().await);
    }
    if want("writes") {
        rows.extend(writes::run().await);
    }
    if want("watch") {
        rows.extend(watch::run().await);
    }
    if want("propagation") {
        rows.extend(propagation::run().await);
    }
    if want("growth") {
        rows.extend(growth::run().await);
    }
    println!();
    util::print_table(&rows);
}
