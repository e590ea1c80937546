//! End-to-end scenarios against a real `confab serve` process.

mod abuse;
mod accounts;
mod admin;
mod bad_input;
mod chaos;
mod chat;
mod cli;
mod cluster;
mod crash;
mod database;
mod delivery;
mod encryption;
mod files;
mod groups;
mod harness;
mod messaging;
mod presence;
mod proxy;
mod pty;
mod requests;
mod shared_files;
