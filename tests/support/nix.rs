//! Real Nix (Debian's nix-bin, 2.8) as a fixture maker and as the client under test.
//!
//! `fixture()` builds a small closure with real references (`c` -> `b` -> `a`, and `c` -> `a`)
//! plus an unrelated path, and writes a signed binary cache of them with `nix copy`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub struct Fixture {
    /// The binary cache directory (`nix-cache-info`, `*.narinfo`, `nar/`).
    pub cache: PathBuf,
    pub public_key: String,
    /// Full store paths of the closure of `top`, `top` included.
    pub closure: Vec<String>,
    pub top: String,
    /// A path in the cache that the test views leave out.
    pub outside: String,
    _dir: tempfile::TempDir,
}

const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =\n";

pub fn nix(args: &[&str], home: &Path) -> Output {
    Client::Nix28.run(args, home)
}

/// The Nix a test runs as the client: the host's (Debian bookworm's Nix 2.8), or current Nix
/// (Debian trixie's 2.26) in a root of its own that `scripts/test.sh` makes once, outside the
/// repository, and names in `NIX_SIDECAR_NIX226_ROOT`. It runs there with its own store under
/// `chroot`, in a private mount namespace with `/proc`, `/dev` and `/tmp` (where the tests'
/// files are) bound in, and shares the network namespace, so loopback endpoints work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Nix28,
    Nix226,
}

/// Mounts what current Nix needs in its root, then runs the command there.
const IN_ROOT: &str = r#"root=$1; home=$2; config=$3; shift 3
mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" && mount --rbind /tmp "$root/tmp" || exit 97
exec chroot "$root" env -i HOME="$home" XDG_CACHE_HOME="$home/xdg-cache" PATH=/usr/bin:/bin NIX_CONFIG="$config" "$@""#;

impl Client {
    /// Both clients. Current Nix is required under CI (`scripts/test.sh` sets it up); a
    /// developer's `cargo test` without it runs Nix 2.8 alone, and says so.
    pub fn all() -> Vec<Client> {
        match Client::nix226_root() {
            Some(_) => vec![Client::Nix28, Client::Nix226],
            None if std::env::var_os("CI").is_some() => {
                panic!("NIX_SIDECAR_NIX226_ROOT is not set: run the tests with scripts/test.sh")
            }
            None => {
                eprintln!("current Nix not set up (scripts/test.sh does it): Nix 2.8 only");
                vec![Client::Nix28]
            }
        }
    }

    fn nix226_root() -> Option<PathBuf> {
        let root = PathBuf::from(std::env::var_os("NIX_SIDECAR_NIX226_ROOT")?);
        root.join("usr/bin/nix").exists().then_some(root)
    }

    pub fn name(self) -> &'static str {
        match self {
            Client::Nix28 => "Nix 2.8",
            Client::Nix226 => "Nix 2.26",
        }
    }

    /// Runs `args` (a Nix command) with `home` as HOME.
    pub fn run(self, args: &[&str], home: &Path) -> Output {
        self.command(args, home).output().unwrap_or_else(|e| {
            panic!(
                "cannot run {} with {} (is nix-bin installed? .ci/run installs it): {e}",
                args[0],
                self.name()
            )
        })
    }

    /// The command that runs `args` with `home` as HOME; leading `NAME=value` arguments are
    /// set in its environment (as `env` takes them).
    pub fn command(self, args: &[&str], home: &Path) -> Command {
        match self {
            Client::Nix28 => {
                let split = args.iter().position(|a| !a.contains('=')).unwrap_or(0);
                let (vars, args) = args.split_at(split);
                let mut command = Command::new(args[0]);
                command
                    .args(&args[1..])
                    .env("NIX_CONFIG", NIX_CONFIG)
                    .env("XDG_CACHE_HOME", home.join("xdg-cache"))
                    .env("HOME", home);
                for var in vars {
                    let (name, value) = var.split_once('=').unwrap();
                    command.env(name, value);
                }
                command
            }
            Client::Nix226 => {
                let root = Client::nix226_root().expect("current Nix is set up");
                let mut command = Command::new("unshare");
                command
                    .args(["-m", "sh", "-c", IN_ROOT, "sh"])
                    .arg(root)
                    .arg(home)
                    .arg(NIX_CONFIG)
                    .args(args);
                command
            }
        }
    }

    /// What a program is run under to run beside this client (sharing its store): nothing for
    /// the host's Nix; the root's mounts and `chroot` for current Nix, with `home` as HOME.
    /// The program itself must then be under /tmp.
    pub fn wrapper(self, home: &Path) -> Vec<String> {
        match self {
            Client::Nix28 => Vec::new(),
            Client::Nix226 => {
                let root = Client::nix226_root().expect("current Nix is set up");
                ["unshare", "-m", "sh", "-c", IN_ROOT, "sh"]
                    .into_iter()
                    .map(str::to_string)
                    .chain([
                        root.display().to_string(),
                        home.display().to_string(),
                        NIX_CONFIG.to_string(),
                    ])
                    .collect()
            }
        }
    }

    /// `substitute` with this client.
    pub fn substitute(
        self,
        cache_url: &str,
        public_key: &str,
        paths: &[&str],
        dir: &Path,
    ) -> Output {
        let store = dir.join("dst-store");
        let mut args = vec![
            "nix",
            "copy",
            "--store",
            store.to_str().unwrap(),
            "--from",
            cache_url,
            "--option",
            "trusted-public-keys",
            public_key,
            "--option",
            "connect-timeout",
            "5",
        ];
        args.extend_from_slice(paths);
        self.run(&args, dir)
    }
}

fn ok(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The shared fixture (built once per test binary), with xz NARs.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| build("xz", 20_000))
}

pub fn build(compression: &str, lines: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let expr = format!(
        r#"
let
  mk = name: deps: builtins.derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "/usr/bin/seq 1 {lines} > $out; echo ${{name}} >> $out; ${{builtins.concatStringsSep "; " (map (d: "echo ${{d}} >> $out") deps)}}" ];
  }};
  a = mk "sidecar-test-a" [];
  b = mk "sidecar-test-b" [ a ];
  c = mk "sidecar-test-c" [ b a ];
  outside = mk "sidecar-test-outside" [];
in [ c outside ]
"#
    );
    let built = build_expr(home, "fixture.nix", &expr);
    let mut outs = built.lines().map(str::to_string);
    let (top, outside) = (outs.next().unwrap(), outs.next().unwrap());
    let closure: Vec<String> = ok(nix(&["nix-store", "-qR", &top], home), "nix-store -qR")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(closure.len(), 3, "a, b and c");
    let (cache, public_key) = signed_cache(home, &[top.as_str(), outside.as_str()], compression);
    Fixture {
        cache,
        public_key,
        closure,
        top,
        outside,
        _dir: dir,
    }
}

/// Builds a Nix expression (written to `home/file`) and returns nix-build's output paths.
pub fn build_expr(home: &Path, file: &str, expr: &str) -> String {
    let expr_file = home.join(file);
    std::fs::write(&expr_file, expr).unwrap();
    ok(
        nix(
            &["nix-build", "--no-out-link", expr_file.to_str().unwrap()],
            home,
        ),
        "nix-build",
    )
}

/// A fresh signing key and a binary cache of `paths` (with their closures) written by `nix copy`.
fn signed_cache(home: &Path, paths: &[&str], compression: &str) -> (PathBuf, String) {
    let (sk, pk) = (home.join("sk"), home.join("pk"));
    let (sk_arg, pk_arg) = (sk.to_str().unwrap(), pk.to_str().unwrap());
    // Keys are looked up by name (by Nix too), so every fixture's key has its own.
    let name = format!(
        "sidecar-{}-1",
        home.file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches('.')
    );
    ok(
        nix(
            &[
                "nix-store",
                "--generate-binary-cache-key",
                &name,
                sk_arg,
                pk_arg,
            ],
            home,
        ),
        "generate key",
    );
    let cache = home.join("cache");
    let to = format!(
        "file://{}?secret-key={}&compression={compression}",
        cache.display(),
        sk.display()
    );
    let mut args = vec!["nix", "copy", "--to", to.as_str()];
    args.extend_from_slice(paths);
    ok(nix(&args, home), "nix copy --to");
    (
        cache,
        std::fs::read_to_string(pk).unwrap().trim().to_string(),
    )
}

/// `nix copy --from <cache_url>` of `paths` into a fresh store under `dir`.
pub fn substitute(cache_url: &str, public_key: &str, paths: &[&str], dir: &Path) -> Output {
    Client::Nix28.substitute(cache_url, public_key, paths, dir)
}

/// Whether `path` is now in the fresh store under `dir`.
pub fn in_store(dir: &Path, path: &str) -> bool {
    dir.join("dst-store")
        .join(path.trim_start_matches('/'))
        .exists()
}

/// One store path made by the shell `script` (writing `$out`), in a signed binary cache.
pub fn build_one(name: &str, script: &str, compression: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let expr = format!(
        r#"
builtins.derivation {{
  name = "{name}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "{script}" ];
}}
"#
    );
    let top = build_expr(home, "one.nix", &expr).trim().to_string();
    let (cache, public_key) = signed_cache(home, &[top.as_str()], compression);
    Fixture {
        cache,
        public_key,
        closure: vec![top.clone()],
        outside: top.clone(),
        top,
        _dir: dir,
    }
}

/// `count` independent paths of about `lines` * 6 bytes each, in a binary cache with `compression`.
pub fn build_many(count: usize, lines: u32, compression: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let expr = format!(
        r#"
builtins.genList (i: builtins.derivation {{
  name = "sidecar-many-${{toString i}}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/usr/bin/seq ${{toString i}} {lines} > $out" ];
}}) {count}
"#
    );
    let built = build_expr(home, "many.nix", &expr);
    let paths: Vec<String> = built.lines().map(str::to_string).collect();
    assert_eq!(paths.len(), count);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let (cache, public_key) = signed_cache(home, &refs, compression);
    Fixture {
        cache,
        public_key,
        top: paths[0].clone(),
        outside: paths[count - 1].clone(),
        closure: paths,
        _dir: dir,
    }
}

/// A chain `depth` paths deep (each refers to the one built before it), signed into a binary
/// cache; `top` is the deepest path's dependant, the last one built.
pub fn build_chain(depth: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let expr = format!(
        r#"
let
  mk = n: builtins.derivation {{
    name = "sidecar-chain-${{toString n}}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${{toString n}} ${{if n == 0 then "" else toString (mk (n - 1))}} > $out" ];
  }};
in mk {}
"#,
        depth - 1
    );
    let top = build_expr(home, "chain.nix", &expr).trim().to_string();
    let paths: Vec<String> = ok(nix(&["nix-store", "-qR", &top], home), "nix-store -qR")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(paths.len(), depth);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let (cache, public_key) = signed_cache(home, &refs, "none");
    Fixture {
        cache,
        public_key,
        outside: paths[0].clone(),
        top,
        closure: paths,
        _dir: dir,
    }
}

/// `count` leaves of about `lines` * 6 bytes each and a root that refers to all of them,
/// built into the local store (no binary cache). Returns the root and the leaves.
pub fn build_fan(count: usize, lines: u32, home: &Path) -> (String, Vec<String>) {
    let expr = format!(
        r#"
let
  leaves = builtins.genList (i: builtins.derivation {{
    name = "sidecar-push-leaf-${{toString i}}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "/usr/bin/seq ${{toString i}} {lines} > $out" ];
  }}) {count};
in builtins.derivation {{
  name = "sidecar-push-root";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${{builtins.concatStringsSep " " leaves}} > $out" ];
}}
"#
    );
    let root = build_expr(home, "fan.nix", &expr).trim().to_string();
    let closure: Vec<String> = ok(nix(&["nix-store", "-qR", &root], home), "nix-store -qR")
        .lines()
        .filter(|p| *p != root)
        .map(str::to_string)
        .collect();
    assert_eq!(closure.len(), count);
    (root, closure)
}

impl Fixture {
    /// The cache's narinfo text for `path`, its NAR file's bytes, and the NAR's `URL:`.
    pub fn files(&self, path: &str) -> (String, Vec<u8>, String) {
        let hash = super::upstream::hash_part(path);
        let narinfo = std::fs::read_to_string(self.cache.join(format!("{hash}.narinfo"))).unwrap();
        let url = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_string();
        let nar = std::fs::read(self.cache.join(&url)).unwrap();
        (narinfo, nar, url)
    }
}
