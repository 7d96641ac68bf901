//! `keyward bench`: load generator (placeholder until wired).
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn main(_args: BenchArgs) -> ExitCode {
    ExitCode::FAILURE
}
