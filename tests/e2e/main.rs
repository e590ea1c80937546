//! End-to-end scenarios against a real `confab serve` process.

mod harness;
mod messaging;
mod presence;
mod bad_input;
mod accounts;
