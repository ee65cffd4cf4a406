//! The `matrix-gatekeeper` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use matrix_gatekeeper::config::{Config, ConfigError};
use matrix_gatekeeper::server::{shutdown_signal, Server};

/// Exit status for a configuration that cannot be used (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit status when the listen addresses cannot be bound (EX_OSERR).
const EXIT_BIND: u8 = 71;

#[derive(Parser)]
#[command(
    name = "matrix-gatekeeper",
    version,
    about = "A registration-guarding reverse proxy for Matrix homeservers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gate.
    Serve {
        /// Configuration file; without it, the embedded example configuration.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and print the effective policy.
    Check {
        /// Configuration file; without it, the embedded example configuration.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(path) => Config::from_file(path),
        None => Config::from_toml(matrix_gatekeeper::config::EMBEDDED_EXAMPLE),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, serve) = match &cli.command {
        Command::Serve { config } => (config.as_ref(), true),
        Command::Check { config } => (config.as_ref(), false),
    };
    let config = match load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("matrix-gatekeeper: invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !serve {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("matrix-gatekeeper: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match Server::bind(&config).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(%error, "cannot bind");
                return ExitCode::from(EXIT_BIND);
            }
        };
        tracing::info!(
            listen = ?server.local_addrs(),
            upstream = %config.upstream.url,
            "matrix-gatekeeper listening"
        );
        server.run(shutdown_signal()).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}
