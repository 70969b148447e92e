//! `bd-server`: see `bd-server --help` and docs/server.md.

use clap::Parser;
use server::cli::{self, Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: node logs go to files in dev.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match &cli.command {
        Command::Run(args) => cli::run(args),
        Command::Dev(args) => server::dev::dev(args),
        Command::InitCa { dir } => cli::init_ca(dir),
        Command::IssueCert {
            ca_dir,
            node_id,
            out,
        } => cli::issue_cert(ca_dir, *node_id, out),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("bd-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
