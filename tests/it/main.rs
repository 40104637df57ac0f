//! Integration tests of the `biofeed` binary against the real Postgres, ClickHouse and Kafka that
//! `compose/local up` starts. Each test makes its own Postgres database, ClickHouse database and
//! Kafka topics (random names), so tests run in parallel and leave the shared ones alone.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test here

mod chaos;
mod cluster;
mod compose_file;
mod consumers;
mod exports;
mod gateway;
mod gateway_app;
mod gateway_tls;
mod helpers;
mod jobs;
mod layering;
mod live;
mod migrate;
mod people;
mod privacy;
mod private_clickhouse;
mod private_kafka;
mod registry;
mod security;
mod services;
mod settings;
mod simulate;
mod up;
mod web;
