//! Runs the real `nix-sidecar` binary on an ephemeral loopback port, logs captured to a file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sidecar {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
    pub dir: PathBuf,
    config: String,
    env: Vec<(String, String)>,
    /// A command the daemon runs under (`wrapper... nix-sidecar serve ...`).
    wrapper: Vec<String>,
    /// Another copy of the binary to run (one the wrapper can reach).
    binary: Option<PathBuf>,
    /// Start from an empty environment (PATH kept, HOME = `dir`) plus `env`, for tests of
    /// what the daemon finds in its environment.
    clean_env: bool,
    /// Run `serve` with these arguments and no config file (`--listen` and `--cache-dir`
    /// are added).
    cli_args: Option<Vec<String>>,
    /// Run `nix-sidecar exchange` with `config` instead of the daemon.
    exchange: bool,
}

impl Sidecar {
    /// Starts with `config` (TOML, without `listen` and `cache-dir`, which are added) in `dir`.
    pub fn start(dir: &Path, config: &str, env: &[(&str, &str)]) -> Sidecar {
        Sidecar::start_wrapped(dir, config, env, &[])
    }

    /// Like `start`, in an environment of only `env` (and PATH, and HOME = `dir`).
    pub fn start_clean(dir: &Path, config: &str, env: &[(&str, &str)]) -> Sidecar {
        let mut sidecar = Sidecar::new(dir, config, env, &[]);
        sidecar.clean_env = true;
        sidecar.spawn();
        sidecar
    }

    /// `nix-sidecar serve ARGS` without a config file, in a clean environment.
    pub fn start_cli(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let mut sidecar = Sidecar::new(dir, "", env, &[]);
        sidecar.clean_env = true;
        sidecar.cli_args = Some(args.iter().map(|a| a.to_string()).collect());
        sidecar.spawn();
        sidecar
    }

    /// `nix-sidecar exchange` with `config` (TOML without `listen`, which is added).
    pub fn start_exchange(dir: &Path, config: &str) -> Sidecar {
        let mut sidecar = Sidecar::new(dir, config, &[], &[]);
        sidecar.exchange = true;
        sidecar.log = dir.join("exchange.log");
        sidecar.spawn();
        sidecar
    }

    /// The daemon beside `client`, sharing its Nix store (for `nix-sidecar push`, which reads
    /// it): for current Nix, a copy of the binary runs in its root.
    pub fn start_beside(client: super::nix::Client, dir: &Path, config: &str) -> Sidecar {
        let wrapper = client.wrapper(dir);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let mut sidecar = Sidecar::new(dir, config, &[], &wrapper);
        if client == super::nix::Client::Nix226 {
            let binary = dir.join("nix-sidecar");
            std::fs::copy(env!("CARGO_BIN_EXE_nix-sidecar"), &binary).unwrap();
            sidecar.binary = Some(binary);
        }
        sidecar.spawn();
        sidecar
    }

    /// `start_exchange` with the service run as the last argument of `wrapper`.
    pub fn start_exchange_wrapped(dir: &Path, config: &str, wrapper: &[&str]) -> Sidecar {
        let mut sidecar = Sidecar::new(dir, config, &[], wrapper);
        sidecar.exchange = true;
        sidecar.log = dir.join("exchange.log");
        sidecar.spawn();
        sidecar
    }

    /// Like `start`, with the daemon run as the last argument of `wrapper`.
    pub fn start_wrapped(
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Sidecar {
        let mut sidecar = Sidecar::new(dir, config, env, wrapper);
        sidecar.spawn();
        sidecar
    }

    fn new(dir: &Path, config: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Sidecar {
        Sidecar {
            clean_env: false,
            cli_args: None,
            exchange: false,
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            binary: None,
            child: None,
            url: String::new(),
            log: dir.join("sidecar.log"),
            dir: dir.to_path_buf(),
            config: config.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    fn spawn(&mut self) {
        let (config_path, full) = if self.exchange {
            let full = format!("listen = \"127.0.0.1:0\"\n{}", self.config);
            (self.dir.join("exchange.toml"), full)
        } else {
            // What is stored must not depend on how full the test machine's disk is: a fresh
            // CI build can leave less than the default min-free-space (2 GiB), and the daemon
            // would then rightly pass every NAR through. Tests of that rule set it themselves.
            let min_free = if self.config.contains("min-free-space") {
                ""
            } else {
                "min-free-space = \"0\"\n"
            };
            let full = format!(
                "listen = [\"127.0.0.1:0\"]\ncache-dir = \"{}\"\n{min_free}{}",
                self.cache_dir().display(),
                self.config
            );
            (self.dir.join("sidecar.toml"), full)
        };
        std::fs::write(&config_path, full).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let start_len = log.metadata().unwrap().len();
        let binary = self
            .binary
            .clone()
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_nix-sidecar").into());
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        if self.clean_env {
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("HOME", &self.dir);
        }
        if self.exchange {
            cmd.arg("exchange");
        } else {
            cmd.arg("serve");
        }
        match &self.cli_args {
            Some(args) => {
                cmd.args(["--listen", "127.0.0.1:0", "--cache-dir"])
                    .arg(self.cache_dir())
                    .args(args);
            }
            None => {
                cmd.arg("--config").arg(&config_path);
            }
        }
        cmd.env(
            "NIX_SIDECAR_LOG",
            std::env::var("TEST_SIDECAR_LOG").unwrap_or("debug".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(super::spawn_copied(&mut cmd).expect("start nix-sidecar"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut text = String::new();
            std::fs::File::open(&self.log)
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            let fresh = &text[start_len as usize..];
            if let Some(line) = fresh.lines().find(|l| l.contains("listening")) {
                let addr = line
                    .split("addr=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap();
                self.url = format!("http://{addr}");
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nix-sidecar exited ({status}) before listening:\n{fresh}");
            }
            assert!(
                Instant::now() < deadline,
                "nix-sidecar did not start:\n{fresh}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `<hash>.narinfo` for a store path.
    pub async fn narinfo(&self, store_path: &str) -> super::http::Got {
        let hash = super::upstream::hash_part(store_path);
        super::http::get(&format!("{}/{hash}.narinfo", self.url), "GET", &[]).await
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns how long the exit took.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "nix-sidecar exited with {status} after SIGTERM:\n{}",
                self.logs()
            );
        }
        started.elapsed()
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `nix-sidecar cache <action>` on this sidecar's cache (stop it first).
    pub fn cache_command(&self, action: &str) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(["cache", action, "--cache-dir"])
            .arg(self.cache_dir())
            .output()
            .unwrap()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}
