//! The integration tests: one binary, so that every test shares one
//! PostgreSQL cluster (a database and a server of its own per test, as
//! before). Each module reads as a spec of one part of the tool; `common`
//! runs the real binary and computes ground truth with SQL.

mod common;

mod aggregate;
mod billing;
mod cli_reference;
mod config;
mod dashboard;
mod doctor;
mod examples;
mod faults;
mod flags;
mod incremental;
mod metrics;
mod model;
mod operator;
mod pace;
mod quotas;
mod rebooked;
mod rpc;
mod schedule;
mod schemas;
mod snapshots;
mod supabase;
mod trust;
