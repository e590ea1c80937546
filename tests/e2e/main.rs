//! End-to-end scenarios against a real `confab serve` process.

mod harness;
mod messaging;
