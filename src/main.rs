//! The `matrix-gatekeeper` command.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use matrix_gatekeeper::config::{AdminConfig, Config, ConfigError, GuestAccess, Secrets};
use matrix_gatekeeper::defences::lists::{remote, CopyState, Stamp};
use matrix_gatekeeper::explain::{
    explain_with, look_up_dnsbl, read_gate, AdminTarget, GateRead, Live, Question,
};
use matrix_gatekeeper::probe;
use matrix_gatekeeper::server::{shutdown_signal, Hangups, Server};
use matrix_gatekeeper::telemetry::init_logging;
use matrix_gatekeeper::upstream::identify;

/// Exit status for a configuration that cannot be used (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit status when the listen addresses cannot be bound (EX_OSERR).
const EXIT_BIND: u8 = 71;
/// Exit status of `explain --admin` when the running gate's state could not
/// be read, and of `serve` when a list fetched from a URL has no copy and
/// cannot be fetched (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

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
    /// Print the decision the gate takes on a registration, the rule that
    /// made it, and the rate limits the request counts against.
    #[command(after_long_help = EXPLAIN_NOTES)]
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
        /// Explain `POST …/register/email/requestToken` for this address
        /// (`[email]` domain rules and lists) instead of a registration.
        #[arg(long, conflicts_with_all = ["username", "guest"])]
        email: Option<String>,
        /// Make no DNSBL lookup of `--ip` (only name the queries).
        #[arg(long)]
        no_dns: bool,
        /// The running gate's admin listener (`http://127.0.0.1:9009`):
        /// read its temporary bans, whether registration is closed, and
        /// what `--ip` has left of each limit.
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// The admin token's file, instead of `[admin] token_file` of the
        /// configuration.
        #[arg(long, value_name = "PATH", requires = "admin")]
        admin_token_file: Option<PathBuf>,
    },
    /// Check from outside that every spelling of every registration route
    /// is answered by the gate.
    #[command(after_long_help = PROBE_NOTES)]
    Probe {
        /// Public base URLs: the client URL and every other port the
        /// homeserver answers on (e.g. `https://example.org:8448`);
        /// `https://` or `http://`.
        #[arg(required = true, value_name = "URL")]
        urls: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Longest wait for one probe (connect, TLS handshake, send, answer).
        #[arg(long, default_value = "5s", value_name = "DUR")]
        timeout: String,
        /// `Host` header to send instead of each URL's host and port (when
        /// probing through a tunnel or an address); for `https://` URLs its
        /// host is also the name the certificate is checked for, and the SNI.
        #[arg(long, value_name = "HOST[:PORT]")]
        host: Option<String>,
        /// PEM file of CA certificates to trust for `https://` URLs besides
        /// the public roots (a private CA).
        #[arg(long, value_name = "PATH")]
        ca_file: Option<PathBuf>,
    },
    /// Exit 0 if the admin listener answers `/healthz` (for container
    /// health checks, where no HTTP client is installed).
    Healthcheck {
        /// The `/healthz` URL.
        #[arg(long, default_value = "http://127.0.0.1:9009/healthz")]
        url: String,
    },
}

/// The part of `explain --help` that does not fit one option.
const EXPLAIN_NOTES: &str = "\
With --ip and [reputation] dnsbl configured, the DNSBL lookups the gate
would make are made (unless --no-dns). With --admin, the running gate's
temporary bans, lockdown and the client's remaining budgets are read from
its admin API and decide as they would in the gate; without it, they are
not read.

Exit status: 0 allowed; 1 refused or rate limited; 64 the configuration,
--admin URL or admin token cannot be used; 69 the admin API could not be
read (the explanation without it is printed).";

/// The part of `probe --help` that does not fit one option.
const PROBE_NOTES: &str = "\
Every probe is harmless even where it reaches the homeserver directly: no
account, no e-mail or SMS, no registration token used. Answers that carry
the X-Matrix-Gatekeeper header come from the gate; probes count against the
gate's rate limits like any request.

Exit status: 0 every probe was answered by the gate; 1 some spelling reached
something else (named in the output) or got no answer; 2 the probe could not
run (a bad argument, or nothing answered at a URL).

Each URL is also asked for GET /_matrix/client/v1/auth_metadata: a homeserver
that delegates registration to an OAuth 2.0 server (Matrix Authentication
Service) is named in a WARNING line, as the gate does not guard it there;
the exit status stays as above.

HTTPS: certificates are checked against the public roots built in (and
--ca-file), for the URL's host or --host's. A failed handshake counts as no
answer; a URL where none succeeds is named with the reason (exit status 2).
To probe a server by address, keep its public name for the certificate and
the Host header:
  matrix-gatekeeper probe https://203.0.113.7:8448 --host example.org:8448";

fn load(path: Option<&PathBuf>, secrets: Secrets) -> Result<Config, ConfigError> {
    match path {
        Some(path) => Config::from_file_with(path, secrets),
        None => Config::from_toml_with(matrix_gatekeeper::config::EMBEDDED_EXAMPLE, secrets),
    }
}

fn load_or_exit(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    load_or_exit_with(path, Secrets::Read)
}

fn load_or_exit_with(path: Option<&PathBuf>, secrets: Secrets) -> Result<Config, ExitCode> {
    load(path, secrets).map_err(|error| {
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
                println!("# {}", app_services_summary(&config));
                for note in remote_list_notes(&config) {
                    println!("# {note}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Explain {
            config: config_path,
            username,
            guest,
            ip,
            user_agent,
            email,
            no_dns,
            admin,
            admin_token_file,
        } => {
            // The service's secret files are not needed to explain a
            // decision, and the operator asking may not be able to read
            // them; the admin token is read only with `--admin`.
            let config = match load_or_exit_with(config_path.as_ref(), Secrets::Skip) {
                Ok(config) => config,
                Err(code) => return code,
            };
            for note in remote_list_notes(&config) {
                eprintln!("explain: {note}");
            }
            let question = Question {
                username,
                guest,
                ip,
                user_agent,
                email,
            };
            let admin = match admin
                .map(|url| admin_target(&config, &url, admin_token_file.as_ref()))
                .transpose()
            {
                Ok(admin) => admin,
                Err(error) => {
                    eprintln!("explain: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match runtime(1) {
                Ok(runtime) => runtime,
                Err(code) => return code,
            };
            let live = runtime.block_on(async {
                let dnsbl = match ip.filter(|_| !no_dns) {
                    Some(ip) => look_up_dnsbl(&config, ip).await,
                    None => None,
                };
                let gate = match &admin {
                    Some(target) => read_gate(target, ip).await,
                    None => GateRead::NotAsked,
                };
                Live { dnsbl, gate }
            });
            let explained = explain_with(&config, &question, &live);
            let source = config_path
                .as_ref()
                .map_or_else(|| "embedded".to_owned(), |p| p.display().to_string());
            println!("configuration: {source}");
            print!("{explained}");
            if let GateRead::Failed { url, error } = &explained.gate {
                eprintln!("explain: the gate's state could not be read from {url}: {error}");
                ExitCode::from(EXIT_UNAVAILABLE)
            } else if explained.allowed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Healthcheck { url } => healthcheck(&url),
        Command::Probe {
            urls,
            json,
            timeout,
            host,
            ca_file,
        } => probe(&urls, json, &timeout, host, ca_file.as_deref()),
        Command::Serve { config: path } => {
            // Before the configuration and its lists are read, which takes
            // a while for large lists: `systemctl reload` right after a
            // start must not end the process (SIGHUP's default action).
            let hangups = catch_hangups();
            let config_stamp = path
                .as_deref()
                .and_then(matrix_gatekeeper::defences::lists::stamp);
            let config = match load_or_exit(path.as_ref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            if let Err(message) = init_logging(&config.log) {
                eprintln!("matrix-gatekeeper: invalid configuration: {message}");
                return ExitCode::from(EXIT_CONFIG);
            }
            serve(config, path, hangups, config_stamp)
        }
    }
}

/// The admin listener `explain --admin` reads, with the token of
/// `token_file` or else of the configuration's `[admin] token_file`.
fn admin_target(
    config: &Config,
    url: &str,
    token_file: Option<&PathBuf>,
) -> Result<AdminTarget, String> {
    let mut admin = match token_file {
        Some(path) => AdminConfig::with_token_file(path.clone()),
        None => config.admin.clone(),
    };
    admin
        .read_token(Secrets::Read)
        .map_err(|error| format!("{error} (another file can be named with --admin-token-file)"))?;
    let token = admin.token().ok_or(
        "--admin needs the admin token: set [admin] token_file in the configuration \
         or pass --admin-token-file",
    )?;
    AdminTarget::new(url, token).map_err(|error| format!("--admin {error}"))
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

/// SIGHUPs caught from now on, for the server to reload on once it runs;
/// `None` if they cannot be (the server then catches them itself).
fn catch_hangups() -> Option<Hangups> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .ok()?;
    let _entered = runtime.enter();
    Hangups::listen().ok()
}

/// Serves `config`, read from `path` (`None`: embedded) while the file had
/// `config_stamp`.
fn serve(
    config: Config,
    path: Option<PathBuf>,
    hangups: Option<Hangups>,
    config_stamp: Stamp,
) -> ExitCode {
    let runtime = match runtime(config.server.workers) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let mut config = config;
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        // A list fetched from a URL with no copy yet is fetched before the
        // gate serves; one with a copy is refreshed in the background.
        match remote::fetch_missing(&config.remote_set()).await {
            Ok(false) => {}
            Ok(true) => {
                if let Err(error) = config.load_lists() {
                    tracing::error!(%error, "invalid configuration");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot start without this list");
                eprintln!("matrix-gatekeeper: {error}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        }
        let mut server = match Server::bind(&config).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(key = error.key, address = %error.addr, "{error}");
                return ExitCode::from(EXIT_BIND);
            }
        };
        let source = match &path {
            Some(path) => path.display().to_string(),
            None => "embedded".to_owned(),
        };
        if let Some(path) = path {
            server = server
                .with_config_path(path)
                .read_when(&config, config_stamp);
        }
        if let Some(hangups) = hangups {
            server = server.with_hangups(hangups);
        }
        let listen = server
            .local_addrs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let admin = server
            .admin_addr()
            .map_or_else(|| "off".to_owned(), |addr| addr.to_string());
        tracing::info!(
            listen = %listen,
            admin = %admin,
            upstream = %config.upstream.url,
            mode = config.registration.mode.as_str(),
            config = %source,
            "matrix-gatekeeper listening"
        );
        if source == "embedded" {
            tracing::info!(
                "running with the embedded example configuration; pass --config FILE for your own"
            );
        }
        log_app_services(&config);
        tokio::spawn(look_at_the_homeserver(config.clone()));
        server.run(shutdown).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// One TCP connection to the homeserver at start: a gate whose homeserver is
/// down still starts (the homeserver may come up later), but says so. With
/// guests allowed it then asks what the homeserver is, and says when
/// `[homeserver] guest_upgrades` does not fit it.
async fn look_at_the_homeserver(config: Config) {
    let upstream = &config.upstream;
    let url = &upstream.url;
    let host = url.host().unwrap_or("127.0.0.1");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_u16().unwrap_or(80);
    let connect = tokio::net::TcpStream::connect((host, port));
    let problem = match tokio::time::timeout(upstream.connect_timeout.0, connect).await {
        Ok(Ok(_)) => None,
        Ok(Err(error)) => Some(error.to_string()),
        Err(_) => Some(format!(
            "no connection within {:?}",
            upstream.connect_timeout.0
        )),
    };
    if let Some(problem) = problem {
        tracing::warn!(
            upstream = %url,
            error = %problem,
            "the homeserver cannot be reached yet; requests get 502 until it can"
        );
        return;
    }
    // What the homeserver is matters only to a guest upgrade, which the
    // gate grants only while guests are allowed: otherwise it asks nothing.
    if config.guest.access != GuestAccess::Allow {
        return;
    }
    let guest_upgrades = config.homeserver.guest_upgrades;
    let Some(software) = identify::identify(url, upstream.connect_timeout.0).await else {
        tracing::info!(
            guest_upgrades,
            "the homeserver does not say what it is (no federation /version, no Synapse \
             server_version); [homeserver] guest_upgrades is used as set"
        );
        return;
    };
    tracing::info!(
        homeserver = %software.name,
        version = %software.version,
        "the homeserver says what it is"
    );
    match identify::advice(&software, guest_upgrades, config.guest.access) {
        Some(identify::Advice::Warn(message)) => tracing::warn!("{message}"),
        Some(identify::Advice::Hint(message)) => tracing::info!("{message}"),
        None => {}
    }
}

/// `probe`: checks the arguments, runs the probes, prints the report.
fn probe(
    urls: &[String],
    json: bool,
    timeout: &str,
    host: Option<String>,
    ca_file: Option<&std::path::Path>,
) -> ExitCode {
    let (urls, options) = match probe::parse_arguments(urls, timeout, host, ca_file) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("probe: {error}");
            return ExitCode::from(probe::EXIT_CANNOT_RUN);
        }
    };
    let runtime = match runtime(1) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let report = runtime.block_on(probe::run(&urls, &options));
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    ExitCode::from(report.exit_status())
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
                eprintln!("healthcheck: {url} answered {}", response.status());
                ExitCode::FAILURE
            }
            Ok(Err(error)) => {
                let cause = std::error::Error::source(&error)
                    .map(|source| format!(" ({source})"))
                    .unwrap_or_default();
                eprintln!("healthcheck: {url}: {error}{cause}");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("healthcheck: {url}: no answer within 3 s");
                ExitCode::FAILURE
            }
        }
    })
}

/// How bridges' registrations are treated, in one line: what the
/// start-up log and `check` say.
fn app_services_summary(config: &Config) -> String {
    let services = &config.homeserver.app_services;
    if services.is_empty() {
        "application services: no registration file configured; bridge registrations \
         (m.login.application_service with a token) are forwarded for the homeserver to \
         check the token, and count against attempts_per_ip \
         (set homeserver.app_service_config_files to check them here and exempt them)"
            .to_owned()
    } else {
        format!(
            "application services: {} registration file(s) ({}); bridge registrations are \
             checked against them (token, user namespace)",
            services.len(),
            services.ids().join(", ")
        )
    }
}

/// What `check` and `explain` say of lists fetched from URLs that are not
/// in force: neither fetches (they read the copies under `state_dir`).
fn remote_list_notes(config: &Config) -> Vec<String> {
    config
        .remote_lists()
        .into_iter()
        .filter_map(|(kind, list)| {
            let shown = &list.entry.shown;
            match list.state {
                CopyState::Loaded => None,
                CopyState::Missing => Some(format!(
                    "{}: {shown} has no copy in {} yet; it is read here as empty, and serve fetches it \
                     before it starts",
                    kind.key(),
                    list.copy.parent().map_or_else(String::new, |d| d.display().to_string())
                )),
                CopyState::Dropped => Some(format!(
                    "{}: {shown}'s copy is older than reputation.list_max_age and \
                     on_stale_list = \"drop\": it is read here as empty",
                    kind.key()
                )),
            }
        })
        .collect()
}

/// Says at start how bridges' registrations are treated.
fn log_app_services(config: &Config) {
    tracing::info!("{}", app_services_summary(config));
}
