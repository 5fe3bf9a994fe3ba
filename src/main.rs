//! The `diboas-ledger` command.
fn main() {}
