//! Workload: propagation.

use crate::util::Row;

pub async fn run() -> Vec<Row> {
    Vec::new()
}
