//! Private services for tests that break them on purpose: a RabbitMQ node and a Redis server
//! of their own, on free loopback ports, that a test may close, restart, stop or wipe without
//! disturbing any other test on the machine (which use the shared servers on 5672 and 6379).
//! Both are stopped and their files removed when dropped, also when the test fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a service may take to come up on a loaded 2-core machine (a hang guard).
const START_WITHIN: Duration = Duration::from_secs(90);

static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port")
        .port()
}

fn unique_name(what: &str) -> String {
    format!(
        "bft-{what}-{}-{}",
        std::process::id(),
        INSTANCES.fetch_add(1, Ordering::SeqCst)
    )
}

/// A RabbitMQ node of its own: its own node name, AMQP and distribution ports, config file
/// (the machine's global config names the shared listener on 5672), database and logs.
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
    running: bool,
}

impl PrivateBroker {
    /// Starts the node and waits until it accepts connections.
    pub fn start() -> PrivateBroker {
        let dir = tempfile::Builder::new()
            .prefix("bft-rabbitmq-")
            .tempdir()
            .expect("temp dir");
        // rabbitmq-server run as root switches to the rabbitmq user, which must write here.
        set_mode(dir.path(), 0o777);
        let port = free_port();
        let mut dist_port = free_port();
        while dist_port == port {
            dist_port = free_port();
        }
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("rabbitmq.conf");
        let mut broker = PrivateBroker {
            node: format!("{}@localhost", unique_name("rabbit")),
            port,
            dist_port,
            dir,
            running: false,
        };
        broker.start_node();
        broker
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_node(&mut self) {
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", self.path("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", self.path("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.path("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.path("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", self.path("pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server must be installed for this test");
        assert!(status.success(), "rabbitmq-server -detached: {status}");
        self.running = true;
        let started = Instant::now();
        while !self.ctl(&["await_startup", "--timeout", "5"]) {
            assert!(
                started.elapsed() < START_WITHIN,
                "the private RabbitMQ node {} did not start within {START_WITHIN:?}; its log is in {}",
                self.node,
                self.path("log").display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `rabbitmqctl -n <node> -q <args>`; true when it succeeded.
    fn ctl(&self, args: &[&str]) -> bool {
        Command::new("rabbitmqctl")
            .args(["-n", &self.node, "-q"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn ctl_or_panic(&self, args: &[&str]) {
        assert!(
            self.ctl(args),
            "rabbitmqctl -n {} {}: failed",
            self.node,
            args.join(" ")
        );
    }

    /// Closes every client connection (clients see a forced close and must reconnect).
    pub fn close_connections(&self) {
        self.ctl_or_panic(&["close_all_connections", "chaos"]);
    }

    /// Stops and starts the RabbitMQ application inside the running node: connections drop,
    /// durable queues and their messages stay.
    pub fn restart_app(&self) {
        self.ctl_or_panic(&["stop_app"]);
        self.ctl_or_panic(&["start_app"]);
        self.ctl_or_panic(&["await_startup"]);
    }

    /// Stops the whole node and starts it again from its database: durable queues and
    /// persistent messages survive. With `wipe`, the database is deleted in between: the node
    /// comes back as a new broker that lost every queue, message and binding.
    pub fn restart_node(&mut self, wipe: bool) {
        self.stop();
        if wipe {
            std::fs::remove_dir_all(self.path("mnesia")).expect("wipe the node's database");
        }
        self.start_node();
    }

    /// Stops the node (waits until its process is gone). Idempotent.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let pid_file = self.path("pid");
        let pid = std::fs::read_to_string(&pid_file).ok();
        if !self.ctl(&["stop", pid_file.to_str().unwrap_or_default()]) {
            // The node does not answer: kill its process rather than leave it behind.
            if let Some(pid) = pid.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        self.running = false;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis server of its own, a child process on a free port, without persistence: a restart
/// loses every key, as a crashed cache does.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            child: None,
            dir: tempfile::Builder::new()
                .prefix("bft-redis-")
                .tempdir()
                .expect("temp dir"),
        };
        redis.start_server();
        redis
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn start_server(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--dir"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for this test");
        self.child = Some(child);
        let started = Instant::now();
        while !self.answers() {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the private redis-server on {} exited: {status}", self.port);
            }
            assert!(
                started.elapsed() < START_WITHIN,
                "the private redis-server on {} did not start within {START_WITHIN:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// Kills the server (SIGKILL, as a crash) and starts a new one on the same port: every
    /// key, lease and counter is gone, and clients must reconnect.
    pub fn restart(&mut self) {
        self.stop();
        self.start_server();
    }

    /// Kills the server. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
