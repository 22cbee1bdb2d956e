//! Throwaway PostgreSQL and NATS servers started from installed binaries, in temporary
//! directories on free ports. The integration tests use them, and so will `outbox-cdc demo`.
//! Each server is stopped and its directory removed when dropped.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "cannot find `{binary}`: install {package} (on Debian: `apt-get install {package}`), or put it on PATH"
    )]
    NotInstalled {
        binary: &'static str,
        package: &'static str,
    },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("I/O error while {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmbeddedError {
    let what = what.into();
    move |source| EmbeddedError::Io { what, source }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> Result<u16, EmbeddedError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Names the directory of the PostgreSQL server binaries to use (`initdb`, `pg_ctl`, `psql`,
/// `pg_basebackup`, …): how the tests run against another server version.
pub const POSTGRES_BIN_ENV: &str = "OUTBOX_CDC_PG_BIN";

/// Finds a PostgreSQL server binary: in `$OUTBOX_CDC_PG_BIN`, on PATH, else the newest under
/// /usr/lib/postgresql.
pub fn find_postgres_binary(name: &'static str) -> Result<PathBuf, EmbeddedError> {
    if let Some(dir) = std::env::var_os(POSTGRES_BIN_ENV).filter(|d| !d.is_empty()) {
        let path = Path::new(&dir).join(name);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(EmbeddedError::Failed {
                what: format!("finding `{name}`"),
                detail: format!("{POSTGRES_BIN_ENV}={} has no `{name}`", path.display()),
            })
        };
    }
    if let Some(path) = find_on_path(name) {
        return Ok(path);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    candidates.sort_by_key(|p| {
        p.iter()
            .nth(4)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().ok_or(EmbeddedError::NotInstalled {
        binary: name,
        package: "postgresql",
    })
}

/// Finds `nats-server`: `$OUTBOX_CDC_NATS_SERVER`, PATH, or /usr/sbin.
pub fn find_nats_server() -> Result<PathBuf, EmbeddedError> {
    if let Ok(path) = std::env::var("OUTBOX_CDC_NATS_SERVER")
        && Path::new(&path).is_file()
    {
        return Ok(path.into());
    }
    find_on_path("nats-server")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
        .ok_or(EmbeddedError::NotInstalled {
            binary: "nats-server",
            package: "nats-server",
        })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Settings for a throwaway PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `logical` unless a test needs to see the error for something else.
    pub wal_level: &'static str,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<(String, String)>,
    /// When set, TCP connections need this user's password (SCRAM-SHA-256); the Unix socket
    /// stays `trust` for setup.
    pub password_user: Option<(String, String)>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            wal_level: "logical",
            settings: Vec::new(),
            password_user: None,
        }
    }
}

/// A PostgreSQL cluster in a temporary directory.
pub struct EmbeddedPostgres {
    dir: TempDir,
    port: u16,
    pg_ctl: PathBuf,
    run_as_postgres: bool,
}

impl EmbeddedPostgres {
    pub fn start(options: PostgresOptions) -> Result<Self, EmbeddedError> {
        let initdb = find_postgres_binary("initdb")?;
        let pg_ctl = find_postgres_binary("pg_ctl")?;
        let run_as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("outbox-cdc-pg-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        if run_as_postgres {
            // initdb and postgres refuse to run as root: hand the directory to `postgres`.
            run(
                Command::new("chown").arg("postgres:").arg(dir.path()),
                "chown of the PostgreSQL directory",
            )?;
        }
        let data = dir.path().join("data");
        let mut init = pg_command(run_as_postgres, &initdb);
        init.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ]);
        run(&mut init, "initdb")?;

        let port = free_port()?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .map_err(io("opening postgresql.conf"))?;
        let mut lines = vec![
            ("port".to_owned(), port.to_string()),
            ("listen_addresses".into(), "'127.0.0.1'".into()),
            (
                "unix_socket_directories".into(),
                format!("'{}'", dir.path().display()),
            ),
            ("wal_level".into(), options.wal_level.into()),
            ("max_wal_senders".into(), "20".into()),
            ("max_replication_slots".into(), "20".into()),
            ("fsync".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("shared_buffers".into(), "64MB".into()),
            ("max_connections".into(), "100".into()),
        ];
        lines.extend(options.settings.iter().cloned());
        for (key, value) in &lines {
            writeln!(conf, "{key} = {value}").map_err(io("writing postgresql.conf"))?;
        }
        if options.password_user.is_some() {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n",
            )
            .map_err(io("writing pg_hba.conf"))?;
        }
        let server = EmbeddedPostgres {
            dir,
            port,
            pg_ctl,
            run_as_postgres,
        };
        server.pg_ctl_start()?;
        if let Some((user, password)) = &options.password_user {
            server.psql(&format!(
                "SET password_encryption = 'scram-sha-256'; CREATE ROLE \"{user}\" LOGIN REPLICATION SUPERUSER PASSWORD '{}';",
                password.replace('\'', "''")
            ))?;
        }
        Ok(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn pg_ctl_start(&self) -> Result<(), EmbeddedError> {
        let mut start = pg_command(self.run_as_postgres, &self.pg_ctl);
        start
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "start"])
            // Own process group: a Ctrl-C meant for the caller must not stop the server first.
            .process_group(0);
        run(&mut start, "pg_ctl start").map_err(|e| self.with_log(e))
    }

    fn with_log(&self, err: EmbeddedError) -> EmbeddedError {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        match err {
            EmbeddedError::Failed { what, detail } => EmbeddedError::Failed {
                what,
                detail: format!("{detail}\nserver log:\n{log}"),
            },
            other => other,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory that holds the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A URL for `database` as the `postgres` superuser over TCP.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Runs SQL through `psql` on the Unix socket, as the superuser.
    pub fn psql(&self, sql: &str) -> Result<String, EmbeddedError> {
        let psql = find_postgres_binary("psql")?;
        let output = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql])
            .output()
            .map_err(io("running psql"))?;
        if !output.status.success() {
            return Err(EmbeddedError::Failed {
                what: "psql".into(),
                detail: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `pg_ctl stop` with the given mode (`fast`, `immediate`, …).
    pub fn stop(&self, mode: &str) -> Result<(), EmbeddedError> {
        let mut stop = pg_command(self.run_as_postgres, &self.pg_ctl);
        stop.arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        run(&mut stop, "pg_ctl stop")
    }

    /// Starts the server again on the same data directory and port.
    pub fn start_again(&self) -> Result<(), EmbeddedError> {
        self.pg_ctl_start()
    }

    /// A streaming standby of this server, through a new physical slot `slot` on it
    /// (`pg_basebackup -R -S`), with `settings` added to its configuration. Its
    /// `primary_conninfo` names the database `postgres`, as syncing failover slots needs.
    pub fn start_standby(
        &self,
        slot: &str,
        settings: &[(&str, &str)],
    ) -> Result<EmbeddedPostgres, EmbeddedError> {
        self.psql(&format!(
            "SELECT pg_create_physical_replication_slot('{slot}')"
        ))?;
        let basebackup = find_postgres_binary("pg_basebackup")?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-cdc-pg-standby-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        if self.run_as_postgres {
            run(
                Command::new("chown").arg("postgres:").arg(dir.path()),
                "chown of the standby's directory",
            )?;
        }
        let data = dir.path().join("data");
        let mut backup = pg_command(self.run_as_postgres, &basebackup);
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&data)
            .args(["-R", "-S", slot, "-X", "stream", "--no-sync"]);
        run(&mut backup, "pg_basebackup")?;
        let port = free_port()?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .map_err(io("opening the standby's postgresql.conf"))?;
        // Later lines win over the primary's, copied with the backup.
        let mut lines = vec![
            ("port".to_owned(), port.to_string()),
            (
                "unix_socket_directories".to_owned(),
                format!("'{}'", dir.path().display()),
            ),
            ("hot_standby".to_owned(), "on".to_owned()),
        ];
        lines.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        for (key, value) in &lines {
            writeln!(conf, "{key} = {value}").map_err(io("writing postgresql.conf"))?;
        }
        let auto = data.join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&auto).map_err(io("reading postgresql.auto.conf"))?;
        std::fs::write(
            &auto,
            text.replacen(
                "primary_conninfo = '",
                "primary_conninfo = 'dbname=postgres ",
                1,
            ),
        )
        .map_err(io("writing postgresql.auto.conf"))?;
        let standby = EmbeddedPostgres {
            dir,
            port,
            pg_ctl: self.pg_ctl.clone(),
            run_as_postgres: self.run_as_postgres,
        };
        standby.pg_ctl_start()?;
        Ok(standby)
    }

    /// `pg_ctl promote`: a standby becomes a primary on a new timeline.
    pub fn promote(&self) -> Result<(), EmbeddedError> {
        let mut promote = pg_command(self.run_as_postgres, &self.pg_ctl);
        promote
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "promote"]);
        run(&mut promote, "pg_ctl promote").map_err(|e| self.with_log(e))
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        let _ = self.stop("immediate");
    }
}

fn pg_command(as_postgres: bool, binary: &Path) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(binary);
        command
    } else {
        Command::new(binary)
    }
}

fn run(command: &mut Command, what: &str) -> Result<(), EmbeddedError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {what}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(EmbeddedError::Failed {
            what: what.to_owned(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// A `nats-server -js` with its store in a temporary directory.
pub struct EmbeddedNats {
    dir: TempDir,
    port: u16,
    binary: PathBuf,
    extra_config: String,
    child: Option<Child>,
}

impl EmbeddedNats {
    pub fn start() -> Result<Self, EmbeddedError> {
        Self::start_with_config("")
    }

    /// Starts with extra configuration-file text (accounts, authorization, limits).
    pub fn start_with_config(extra_config: &str) -> Result<Self, EmbeddedError> {
        let binary = find_nats_server()?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-cdc-nats-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        let mut server = EmbeddedNats {
            dir,
            port: free_port()?,
            binary,
            extra_config: extra_config.to_owned(),
            child: None,
        };
        server.start_process()?;
        Ok(server)
    }

    fn write_config(&self) -> Result<PathBuf, EmbeddedError> {
        let config = self.dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\n{}\n",
                self.port,
                self.dir.path().join("store").display(),
                self.extra_config
            ),
        )
        .map_err(io("writing nats.conf"))?;
        Ok(config)
    }

    fn start_process(&mut self) -> Result<(), EmbeddedError> {
        let config = self.write_config()?;
        let log = std::fs::File::create(self.dir.path().join("nats.log"))
            .map_err(io("creating the NATS log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("creating the NATS log"))?)
            .stderr(log)
            .spawn()
            .map_err(io("starting nats-server"))?;
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(20)) {
            let log = std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
            return Err(EmbeddedError::Failed {
                what: "nats-server start".into(),
                detail: format!("port {} never accepted connections; log:\n{log}", self.port),
            });
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and store.
    pub fn restart(&mut self) -> Result<(), EmbeddedError> {
        self.kill();
        self.start_process()
    }

    /// The server's log (with `trace: true` in the configuration, every protocol operation).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Replaces the extra configuration text and has the running server reload it (SIGHUP):
    /// what nats-server can change live, such as users and their permissions, applies to new
    /// connections at once.
    pub fn reload_with_config(&mut self, extra_config: &str) -> Result<(), EmbeddedError> {
        self.extra_config = extra_config.to_owned();
        self.write_config()?;
        let pid = self.pid().ok_or_else(|| EmbeddedError::Failed {
            what: "nats-server reload".into(),
            detail: "the server is not running".into(),
        })?;
        // SAFETY: sending a signal to our own child process.
        if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
            return Err(io("signalling nats-server to reload")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

impl Drop for EmbeddedNats {
    fn drop(&mut self) {
        self.kill();
    }
}
