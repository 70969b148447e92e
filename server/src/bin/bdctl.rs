//! `bdctl`: see `bdctl --help` and the README ("Operating a cluster").

use clap::Parser;
use server::ctl::{self, CtlArgs};

fn main() -> std::process::ExitCode {
    let args = CtlArgs::parse();
    match ctl::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bdctl: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
