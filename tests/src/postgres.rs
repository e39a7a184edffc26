//! A PostgreSQL server for tests: Debian's binaries (`apt-get install postgresql`; `.ci/run`
//! installs them) started in a temporary directory on a free loopback port, stopped and
//! removed when dropped. As root, it runs as the `postgres` user (the server refuses root).
//! With `TOPUP_TEST_POSTGRES_URL` set, that server is used instead (a new database each).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// A running server and a fresh database on it.
pub struct PgServer {
    /// `postgres://...` of the database.
    pub url: String,
    /// Our own server (none when an outside one was given).
    own: Option<(PathBuf, PathBuf, Option<String>)>,
}

fn newest_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn run(user: Option<&str>, program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut command = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    let output =
        command.args(args).output().with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).to_string())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    /// Starts a server (or uses `TOPUP_TEST_POSTGRES_URL`'s) with a fresh database.
    pub async fn start(database: &str) -> anyhow::Result<Self> {
        if let Ok(url) = std::env::var("TOPUP_TEST_POSTGRES_URL") {
            let admin =
                sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&url).await?;
            let name = format!("{database}_{}", std::process::id());
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&admin).await?;
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await?;
            let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
            return Ok(Self { url: format!("{base}/{name}"), own: None });
        }
        let Some(bin) = newest_bin_dir() else {
            bail!(
                "no PostgreSQL server binaries under /usr/lib/postgresql: `apt-get install postgresql` \
                 (.ci/run does), or set TOPUP_TEST_POSTGRES_URL to a server's URL"
            );
        };
        let dir = std::env::temp_dir().join(format!(
            "topup-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let user = if is_root() {
            run(None, Path::new("chown"), &["postgres:postgres", &dir.to_string_lossy()])?;
            Some("postgres".to_string())
        } else {
            None
        };
        let data = dir.join("data");
        let data_s = data.to_string_lossy().to_string();
        run(
            user.as_deref(),
            &bin.join("initdb"),
            &["-D", &data_s, "-U", "topup", "--auth=trust", "-E", "UTF8", "--no-sync"],
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.to_string_lossy()
        );
        let log = dir.join("log").to_string_lossy().to_string();
        run(
            user.as_deref(),
            &bin.join("pg_ctl"),
            &["-D", &data_s, "-o", &options, "-l", &log, "-w", "-t", "60", "start"],
        )?;
        let admin_url = format!("postgres://topup@127.0.0.1:{port}/postgres");
        // Stopped by Drop from here on, whatever happens next.
        let mut server = Self { url: admin_url.clone(), own: Some((bin, data, user)) };
        let admin =
            sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await?;
        admin.close().await;
        server.url = format!("postgres://topup@127.0.0.1:{port}/{database}");
        Ok(server)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some((bin, data, user)) = self.own.take() {
            let data_s = data.to_string_lossy().to_string();
            let _ = run(
                user.as_deref(),
                &bin.join("pg_ctl"),
                &["-D", &data_s, "-m", "immediate", "stop"],
            );
            if let Some(dir) = data.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}
