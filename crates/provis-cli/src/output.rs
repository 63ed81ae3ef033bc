//! How listing commands print: a table for people, or JSON for programs.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people
    Table,
    /// JSON for programs
    Json,
}
