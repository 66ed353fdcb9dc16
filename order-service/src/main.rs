//! The order service binary.

fn main() {}
