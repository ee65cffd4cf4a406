//! The `matrix-gatekeeper` command.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use matrix_gatekeeper::config::{Config, ConfigError};
use matrix_gatekeeper::explain::{explain, Explained, Question};
use matrix_gatekeeper::server::{shutdown_signal, Server};
use matrix_gatekeeper::telemetry::init_logging;

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
    /// Print the decision the policy takes on a registration, and the rule
    /// that made it (rate limits are not evaluated).
    Explain {
        /// Configuration file; without it, the embedded example configuration.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The requested username.
        #[arg(long)]
        username: Option<String>,
        /// A guest registration (`kind=guest`).
        #[arg(long)]
        guest: bool,
        /// The client's address (checked against `[client_ip] deny`).
        #[arg(long)]
        ip: Option<IpAddr>,
        /// The client's user agent (checked against `deny_user_agents`).
        #[arg(long)]
        user_agent: Option<String>,
    },
    /// Exit 0 if the admin listener answers `/healthz` (for container
    /// health checks, where no HTTP client is installed).
    Healthcheck {
        /// The `/healthz` URL.
        #[arg(long, default_value = "http://127.0.0.1:9009/healthz")]
        url: String,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(path) => Config::from_file(path),
        None => Config::from_toml(matrix_gatekeeper::config::EMBEDDED_EXAMPLE),
    }
}

fn load_or_exit(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    load(path).map_err(|error| {
        eprintln!("matrix-gatekeeper: invalid configuration: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load_or_exit(config.as_ref()) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Explain {
            config,
            username,
            guest,
            ip,
            user_agent,
        } => {
            let config = match load_or_exit(config.as_ref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let explained = explain(
                &config,
                &Question {
                    username,
                    guest,
                    ip,
                    user_agent,
                },
            );
            print!("{explained}");
            match explained {
                Explained::Allowed { .. } => ExitCode::SUCCESS,
                Explained::Refused { .. } => ExitCode::from(1),
            }
        }
        Command::Healthcheck { url } => healthcheck(&url),
        Command::Serve { config: path } => {
            let config = match load_or_exit(path.as_ref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            serve(config, path)
        }
    }
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    // One worker: a current-thread runtime, which hands work between the
    // server and client tasks without cross-thread wake-ups.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().map_err(|error| {
        eprintln!("matrix-gatekeeper: cannot start the runtime: {error}");
        ExitCode::FAILURE
    })
}

fn serve(config: Config, path: Option<PathBuf>) -> ExitCode {
    init_logging(&config.log);
    let runtime = match runtime(config.server.workers) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let mut server = match Server::bind(&config).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(%error, "cannot bind");
                return ExitCode::from(EXIT_BIND);
            }
        };
        if let Some(path) = path {
            server = server.with_config_path(path);
        }
        tracing::info!(
            listen = ?server.local_addrs(),
            admin = ?server.admin_addr(),
            upstream = %config.upstream.url,
            mode = config.registration.mode.as_str(),
            "matrix-gatekeeper listening"
        );
        server.run(shutdown_signal()).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

fn healthcheck(url: &str) -> ExitCode {
    let runtime = match runtime(1) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let Ok(uri) = url.parse::<http::Uri>() else {
            eprintln!("healthcheck: invalid URL {url}");
            return ExitCode::FAILURE;
        };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        match tokio::time::timeout(std::time::Duration::from_secs(3), client.get(uri)).await {
            Ok(Ok(response)) if response.status().is_success() => ExitCode::SUCCESS,
            Ok(Ok(response)) => {
                eprintln!("healthcheck: {}", response.status());
                ExitCode::FAILURE
            }
            Ok(Err(error)) => {
                eprintln!("healthcheck: {error}");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("healthcheck: no answer within 3 s");
                ExitCode::FAILURE
            }
        }
    })
}
