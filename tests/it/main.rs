//! Integration tests: the real server on a real port with a real database on
//! disk, driven by generated clients, the CLI and the binary itself.

mod cli;
mod common;
mod durability;
mod fleet;
mod interop;
mod nodes;
mod rpc;
mod watch;
