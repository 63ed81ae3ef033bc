//! The wire contract of provis, generated from `proto/provis/v1/*.proto`:
//! call envelopes and replies carried over NATS, and the minion's local gRPC API.

#![allow(missing_debug_implementations)] // generated gRPC clients and servers

/// Version 1 of the contract (`package provis.v1`).
pub mod v1 {
    tonic::include_proto!("provis.v1");
}
