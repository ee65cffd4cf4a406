//! A private `redis-server` for one test, on a free port, that the test can
//! kill, restart (empty or with the data it saved) and stall.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    cluster: bool,
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts a standalone server.
    pub async fn start() -> RedisServer {
        Self::start_with(false).await
    }

    /// Starts a one-node Redis Cluster owning every slot.
    pub async fn start_cluster() -> RedisServer {
        let server = Self::start_with(true).await;
        let mut con = server.connection().await;
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query_async(&mut con)
            .await
            .expect("assign slots");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut con)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster never became ok: {info}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    async fn start_with(cluster: bool) -> RedisServer {
        let dir =
            std::env::temp_dir().join(format!("mgk-redis-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir,
            cluster,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(&self.dir)
            // `DEBUG SLEEP` stalls the server for the stall tests; Redis 7
            // refuses DEBUG unless this is set.
            .arg("--enable-debug-command")
            .arg("local")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            command
                .arg("--cluster-enabled")
                .arg("yes")
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"));
        }
        let child = command
            .spawn()
            .expect("redis-server must be on PATH (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url().as_str()) {
                if let Ok(mut con) = client.get_multiplexed_async_connection().await {
                    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut con).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url().as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Number of keys in the database.
    pub async fn key_count(&self) -> u64 {
        let mut con = self.connection().await;
        redis::cmd("DBSIZE").query_async(&mut con).await.unwrap()
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("nodes.conf"));
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        self.spawn().await;
    }

    /// Writes the data set to disk (`SAVE`), for
    /// [`RedisServer::restart_with_saved_data`].
    pub async fn save(&self) {
        let mut con = self.connection().await;
        let _: () = redis::cmd("SAVE").query_async(&mut con).await.unwrap();
    }

    /// Starts the server again on the same port with the data of the last
    /// [`RedisServer::save`] (keys and their remaining time to live), as a
    /// Redis with persistence comes back.
    pub async fn restart_with_saved_data(&mut self) {
        self.kill();
        assert!(self.dir.join("dump.rdb").exists(), "nothing was saved");
        self.spawn().await;
    }

    /// Blocks the server for `seconds` (`DEBUG SLEEP`) and returns once it
    /// is verifiably stalled (a `PING` goes unanswered); the handle
    /// completes when the server answers again.
    pub async fn stall(&self, seconds: f64) -> tokio::task::JoinHandle<()> {
        // The client's default response timeout is shorter than a stall.
        let mut sleeper = redis::Client::open(self.url().as_str())
            .unwrap()
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .unwrap();
        let mut prober = self.connection().await;
        let sleep = tokio::spawn(async move {
            let answer: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query_async(&mut sleeper)
                .await;
            answer.expect("DEBUG SLEEP");
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let ping = tokio::time::timeout(
                Duration::from_millis(50),
                redis::cmd("PING").query_async::<String>(&mut prober),
            )
            .await;
            if ping.is_err() {
                return sleep;
            }
            assert!(Instant::now() < deadline, "redis-server never stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The keys matching `pattern`.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut con = self.connection().await;
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut con)
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
