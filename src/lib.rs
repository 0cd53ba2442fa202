//! usage-agg as a library: everything the binary does, so that engines and
//! commands can be tested without it. `src/main.rs` only parses arguments,
//! sets up logging and the runtime, calls [`commands::run`] and exits.
//!
//! The layers, each depending only on those above it:
//! - [`aggregation`]: the pure core (rows in, per-key totals out; no I/O);
//! - [`config`], [`postgrest`]: where to connect, and the protocol;
//! - [`tables`], [`state`], [`preflight`], [`schedule`]: this schema over the protocol;
//! - [`pace`]: how hard a scan leans on the shared database (speed only, never totals);
//! - [`engine`]: the engines and the outcome they report;
//! - [`commands`], [`output`], [`exit`], [`metrics`]: what a user runs, reads and gets back.
//!
//! The contract every engine keeps is docs/semantics.md.

pub mod adjustments;
pub mod aggregation;
pub mod alerts;
pub mod booking;
pub mod charts;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod exit;
pub mod failpoint;
pub mod html_report;
pub mod job;
pub mod ledger;
pub mod metrics;
pub mod migrations;
pub mod output;
pub mod pace;
pub mod periods;
pub mod ping;
pub mod postgrest;
pub mod preflight;
pub mod printer;
pub mod progress;
pub mod quota;
pub mod schedule;
pub mod signing;
pub mod state;
pub mod stdio;
pub mod store;
pub mod tables;
pub mod text_table;
pub mod webhook;
