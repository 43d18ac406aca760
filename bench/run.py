#!/usr/bin/env python3
"""nix-sidecar benchmarks against nginx, on loopback, in one run.

    python3 bench/run.py    # needs nginx-light, wrk, curl, openssl, nix-bin; builds --release
    BENCH_ONLY=3,6 python3 bench/run.py   # only some scenarios

Sets up an HTTPS upstream (nginx, self-signed certificate, given to nix-sidecar as ca-file), an
nginx serving the same binary cache statically (sendfile), an nginx proxy_cache in front of the
upstream (the community recipe: cache lock on), and nix-sidecar in front of the upstream. Each
scenario runs several rounds alternating the contestants and prints medians and ratios.
Machines here are shared and noisy: read the ratios, not the absolute numbers.
"""
import hashlib, os, resource, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
BIG = int(os.environ.get("BENCH_BIG_MIB", "1024")) << 20
SMALL_NARINFOS = 1000
WAN_RATE_MIB = int(os.environ.get("BENCH_WAN_MIB", "50"))
# Scenario 9: the round trip added to every request, and each upstream's rate per connection.
WAN_DELAY_S = int(os.environ.get("BENCH_WAN_DELAY_MS", "40")) / 1000
WAN_UPSTREAM_MIB = int(os.environ.get("BENCH_WAN_UPSTREAM_MIB", "100"))


def nixbase32(data: bytes) -> str:
    n = (len(data) * 8 + 4) // 5
    out = []
    for i in range(n - 1, -1, -1):
        b = i * 5
        j, k = b // 8, b % 8
        c = data[j] >> k
        if j + 1 < len(data):
            c |= data[j + 1] << (8 - k)
        out.append(ALPHABET[c & 0x1F])
    return "".join(out)


def store_hash(seed: str) -> str:
    return nixbase32(hashlib.sha256(seed.encode()).digest()[:20])


def write_nar(cache: str, name: str, size: int) -> str:
    """A NAR file of `size` random bytes and its narinfo; returns the store path hash."""
    os.makedirs(os.path.join(cache, "nar"), exist_ok=True)
    h = hashlib.sha256()
    tmp = os.path.join(cache, "nar", "tmp")
    with open(tmp, "wb") as f, open("/dev/urandom", "rb") as rnd:
        left = size
        while left:
            chunk = rnd.read(min(left, 8 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    digest = nixbase32(h.digest())
    nar = f"nar/{digest}.nar"
    os.rename(tmp, os.path.join(cache, nar))
    sh = store_hash(name)
    with open(os.path.join(cache, f"{sh}.narinfo"), "w") as f:
        f.write(f"StorePath: /nix/store/{sh}-{name}\nURL: {nar}\nCompression: none\n"
                f"FileHash: sha256:{digest}\nFileSize: {size}\nNarHash: sha256:{digest}\nNarSize: {size}\nReferences: \n")
    return sh


def free_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Bench:
    def __init__(self, work: str):
        self.work = work
        self.cache = os.path.join(work, "cache")
        self.procs = []
        self.ports = {k: free_port() for k in ["upstream", "static", "proxy", "sidecar", "wan-a", "wan-b", "exchange"]}

    def url(self, who: str, path: str) -> str:
        scheme = "https" if who == "upstream" else "http"
        return f"{scheme}://127.0.0.1:{self.ports[who]}/{path}"

    def setup(self):
        print(f"# preparing {BIG >> 20} MiB and 64 MiB NARs and {SMALL_NARINFOS} small narinfos in {self.work}", flush=True)
        self.big = write_nar(self.cache, "big", BIG)
        self.mid = write_nar(self.cache, "mid", 64 << 20)
        self.mid2 = write_nar(self.cache, "mid2", 64 << 20)
        self.small = [write_nar(self.cache, f"s{i}", 4096) for i in range(SMALL_NARINFOS)]
        with open(os.path.join(self.cache, "nix-cache-info"), "w") as f:
            f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
        # A throw-away CA and a server certificate it signs (webpki refuses a CA as end entity).
        w = lambda name: os.path.join(self.work, name)
        run = lambda *cmd: subprocess.run(list(cmd), check=True, capture_output=True)
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench-ca",
            "-keyout", w("ca.key"), "-out", w("ca.pem"))
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", w("key.pem"), "-out", w("req.pem"))
        with open(w("ext.cnf"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        run("openssl", "x509", "-req", "-in", w("req.pem"), "-CA", w("ca.pem"), "-CAkey", w("ca.key"), "-CAcreateserial",
            "-days", "2", "-extfile", w("ext.cnf"), "-out", w("cert.pem"))
        cert, key = w("cert.pem"), w("key.pem")
        self.cert = w("ca.pem")
        p = self.ports
        user = "user root;" if os.geteuid() == 0 else ""
        conf = f"""
{user}
worker_processes 2;
error_log {self.work}/nginx-error.log;
pid {self.work}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on; keepalive_requests 100000;
  default_type application/octet-stream;
  proxy_cache_path {self.work}/proxy-cache levels=1:2 keys_zone=nix:64m max_size=20g inactive=1d use_temp_path=off;
  server {{
    listen 127.0.0.1:{p['upstream']} ssl; ssl_certificate {cert}; ssl_certificate_key {key}; root {self.cache};
    location /wan/ {{ alias {self.cache}/; limit_rate {WAN_RATE_MIB}m; }}
    location /slow/ {{ alias {self.cache}/; limit_rate 1m; }}
  }}
  server {{
    listen 127.0.0.1:{p['static']}; root {self.cache};
    location /issuer/ {{ alias {self.work}/issuer/; }}
    location /wan-all/ {{ alias {self.cache}/; limit_rate {WAN_UPSTREAM_MIB}m; }}
    location = /token {{ default_type application/json; return 200 '{{"access_token":"x","token_type":"Bearer"}}'; }}
  }}
  server {{ listen 127.0.0.1:{p['wan-a']}; root {self.work}/wan-a; limit_rate {WAN_UPSTREAM_MIB}m; }}
  server {{ listen 127.0.0.1:{p['wan-b']}; root {self.work}/wan-b; limit_rate {WAN_UPSTREAM_MIB}m; }}
  server {{
    listen 127.0.0.1:{p['proxy']};
    location / {{
      proxy_pass https://127.0.0.1:{p['upstream']};
      proxy_ssl_trusted_certificate {self.cert}; proxy_ssl_verify on; proxy_ssl_name 127.0.0.1;
      proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache nix; proxy_cache_valid 200 1h; proxy_cache_valid 404 1m;
      proxy_cache_lock on; proxy_cache_use_stale error timeout updating;
    }}
    # A cold nginx cache per round: /cold-N/ is a cache of its own (its key holds the prefix).
    location ~ ^/cold-[0-9]+(/.*)$ {{
      proxy_pass https://127.0.0.1:{p['upstream']}$1;
      proxy_ssl_trusted_certificate {self.cert}; proxy_ssl_verify on; proxy_ssl_name 127.0.0.1;
      proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache nix; proxy_cache_key $request_uri; proxy_cache_valid 200 1h; proxy_cache_valid 404 1m;
      proxy_cache_lock on;
    }}
  }}
}}
"""
        with open(os.path.join(self.work, "nginx.conf"), "w") as f:
            f.write(conf)
        subprocess.run(["nginx", "-c", os.path.join(self.work, "nginx.conf"), "-p", self.work], check=True)
        time.sleep(0.5)

    def sidecar_config(self, cache_name="sidecar-cache", upstream_path="", upstream_url=None, extra="") -> str:
        """Writes the config of a nix-sidecar in front of the upstream (or the part of it under
        `upstream_path`, or the plain-HTTP `upstream_url`); returns its path."""
        cache_dir = os.path.join(self.work, cache_name)
        config = os.path.join(self.work, f"{cache_name}.toml")
        upstream = (f'url = "{upstream_url}"\n' if upstream_url else
                    f'url = "https://127.0.0.1:{self.ports["upstream"]}{upstream_path}"\nca-file = "{self.cert}"\n')
        with open(config, "w") as f:
            f.write(f'listen = ["127.0.0.1:{self.ports["sidecar"]}"]\ncache-dir = "{cache_dir}"\n'
                    f'min-free-space = "1GiB"\nmax-cache-size = "50GiB"\n{extra}'
                    f'[[upstream]]\nname = "up"\n{upstream}')
        return config

    def start_sidecar(self, fresh=True, cache_name="sidecar-cache", ready_path="nix-cache-info", upstream_path="",
                      upstream_url=None, extra="") -> float:
        """Starts nix-sidecar; returns the seconds until it answered `ready_path` with 200."""
        self.stop_sidecar()
        if fresh:
            shutil.rmtree(os.path.join(self.work, cache_name), ignore_errors=True)
        config = self.sidecar_config(cache_name, upstream_path, upstream_url, extra)
        log = open(os.path.join(self.work, "sidecar.log"), "a")
        started = time.monotonic()
        self.sidecar = subprocess.Popen([os.environ.get("BENCH_SIDECAR_BIN", os.path.join(ROOT, "target/release/nix-sidecar")), "serve", "--config", config],
                                        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "NIX_SIDECAR_LOG": "warn"})
        while time.monotonic() - started < 30:
            try:
                urllib.request.urlopen(self.url("sidecar", ready_path), timeout=1).read()
                return time.monotonic() - started
            except Exception:
                time.sleep(0.002)
        raise SystemExit("nix-sidecar did not start")

    def stop_sidecar(self, sig=signal.SIGTERM):
        if getattr(self, "sidecar", None):
            self.sidecar.send_signal(sig)
            self.sidecar.wait()
            self.sidecar = None

    def peak_rss_mib(self) -> float:
        with open(f"/proc/{self.sidecar.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def rss_mib(self) -> float:
        with open(f"/proc/{self.sidecar.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def threads(self) -> int:
        with open(f"/proc/{self.sidecar.pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("Threads:"))

    def teardown(self):
        self.stop_sidecar()
        subprocess.run(["nginx", "-c", os.path.join(self.work, "nginx.conf"), "-p", self.work, "-s", "stop"], capture_output=True)


def curl_seconds(url: str, cacert: str = None) -> float:
    cmd = ["curl", "-sf", "-o", "/dev/null", "-w", "%{time_total}", url]
    if cacert:
        cmd[1:1] = ["--cacert", cacert]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def narinfo_path(h: str) -> str:
    return f"{h}.narinfo"


def nar_url_of(b: Bench, who: str, h: str) -> str:
    text = urllib.request.urlopen(b.url(who, narinfo_path(h))).read().decode()
    return next(l[5:] for l in text.splitlines() if l.startswith("URL: "))


def wrk(url_base: str, paths_file: str, connections=64, threads=2) -> str:
    script = os.path.join(os.path.dirname(paths_file), "paths.lua")
    with open(script, "w") as f:
        f.write(f"""
local paths = {{}}
for line in io.lines("{paths_file}") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
""")
    return subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", "-d5s", "--latency", "-s", script, url_base],
                          check=True, capture_output=True, text=True).stdout


def wrk_rps(url_base: str, paths_file: str, connections=64, threads=2) -> float:
    line = next(l for l in wrk(url_base, paths_file, connections, threads).splitlines()
                if l.startswith("Requests/sec:"))
    return float(line.split()[1])


def wrk_p99_ms(url_base: str, paths_file: str, connections: int) -> float:
    out = wrk(url_base, paths_file, connections)
    if "Non-2xx" in out:
        raise SystemExit(f"lookups failed:\n{out}")
    value = next(l.split()[1] for l in out.splitlines() if l.strip().startswith("99%"))
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    unit = next(u for u in ["us", "ms", "s"] if value.endswith(u))
    return float(value[: -len(unit)]) * scale[unit]


def number(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def median(xs):
    return statistics.median(xs)


def warm_nar(b: Bench, results: list):
    """1. The big NAR, already stored, vs nginx sending the same file."""
    b.start_sidecar()
    big_nar = nar_url_of(b, "sidecar", b.big)
    curl_seconds(b.url("sidecar", big_nar))  # fill
    side, stat = [], []
    for _ in range(ROUNDS):
        side.append(BIG / curl_seconds(b.url("sidecar", big_nar)) / 2**20)
        stat.append(BIG / curl_seconds(b.url("static", big_nar)) / 2**20)
    results.append(("1. warm NAR, MiB/s", median(side), "nginx static", median(stat), ">= 0.9"))


def warm_narinfos(b: Bench, who: list) -> str:
    """Asks each of `who` for every small narinfo once (so they are cached); the file of their
    paths, for wrk."""
    paths_file = os.path.join(b.work, "paths.txt")
    with open(paths_file, "w") as f:
        f.write("\n".join("/" + narinfo_path(h) for h in b.small) + "\n")
    for h in b.small:
        for contestant in who:
            urllib.request.urlopen(b.url(contestant, narinfo_path(h))).read()
    return paths_file


def warm_narinfo(b: Bench, results: list):
    """2. Small narinfos, all cached, 64 connections."""
    b.start_sidecar()
    paths_file = warm_narinfos(b, ["sidecar", "proxy"])
    side, proxy, stat = [], [], []
    for _ in range(max(3, ROUNDS // 2)):
        side.append(wrk_rps(b.url("sidecar", ""), paths_file))
        proxy.append(wrk_rps(b.url("proxy", ""), paths_file))
        stat.append(wrk_rps(b.url("static", ""), paths_file))
    results.append(("2. warm narinfo, req/s", median(side), "nginx proxy_cache", median(proxy), ">= 1.0"))
    results.append(("2b. warm narinfo, req/s", median(side), "nginx static", median(stat), "(info)"))


def hit_path(b: Bench, results: list):
    """12. The hit path at its floor: cached narinfos asked one after another on one keep-alive
    connection (`wrk -t1 -c1`), as a lone Nix walking a closure does. Microseconds per request."""
    b.start_sidecar()
    paths_file = warm_narinfos(b, ["sidecar"])
    side, stat = [], []
    for _ in range(max(3, ROUNDS // 2)):
        side.append(1e6 / wrk_rps(b.url("sidecar", ""), paths_file, connections=1, threads=1))
        stat.append(1e6 / wrk_rps(b.url("static", ""), paths_file, connections=1, threads=1))
    results.append(("12. cached narinfo, one keep-alive connection, us/request", median(side),
                    "nginx static", median(stat), "<= 1.0"))


def hashed_download_seconds(url: str, cacert: str) -> float:
    """Downloads and SHA-256s a file the way a client checking it would (curl | openssl)."""
    started = time.monotonic()
    subprocess.run(f"curl -sf --cacert {cacert} {url} | openssl dgst -sha256", shell=True, check=True, capture_output=True)
    return time.monotonic() - started


def cold_nar(b: Bench, results: list):
    """3. The big NAR through an empty nix-sidecar (which checks its hash and stores it) vs
    straight from the TLS upstream, with the hash checked as Nix would, and without."""
    side, hashed, direct = [], [], []
    for _ in range(max(3, ROUNDS // 2)):
        b.start_sidecar(fresh=True)
        url = nar_url_of(b, "sidecar", b.big)
        side.append(BIG / curl_seconds(b.url("sidecar", url)) / 2**20)
        hashed.append(BIG / hashed_download_seconds(b.url("upstream", url), b.cert) / 2**20)
        direct.append(BIG / curl_seconds(b.url("upstream", url), b.cert) / 2**20)
    results.append(("3. cold NAR, MiB/s", median(side), "direct upstream (TLS) + sha256", median(hashed), ">= 0.8"))
    results.append(("3b. cold NAR, MiB/s", median(side), "direct upstream (TLS), no hash", median(direct), "(info)"))


def herd(b: Bench, results: list):
    """4. 100 clients on one cold NAR vs one client alone (64 MiB), with the upstream on
    loopback at full speed, and at a WAN link's speed (nginx limit_rate). The floor: 100
    clients on the same file from nginx static, which is as fast as this machine hands
    6.4 GB to 100 curls; a cold herd cannot finish before that."""
    for label, upstream_path in [("4.", ""), (f"4b. upstream at {WAN_RATE_MIB} MiB/s,", "/wan")]:
        many, one, floor = [], [], []
        for _ in range(max(3, ROUNDS // 2)):
            b.start_sidecar(fresh=True, upstream_path=upstream_path)
            nar = nar_url_of(b, "sidecar", b.mid)
            one.append(curl_seconds(b.url("sidecar", nar)))
            b.start_sidecar(fresh=True, upstream_path=upstream_path)
            many.append(crowd_seconds(b.url("sidecar", nar_url_of(b, "sidecar", b.mid))))
            floor.append(crowd_seconds(b.url("static", nar)))
        results.append((f"{label} one cold 64 MiB NAR, 100 clients, s", median(many), "one client alone", median(one), "<= 1.2"))
        results.append((f"{label} floor: 100 clients on nginx static, s", median(floor), "one client alone", median(one), "(info)"))


def crowd_seconds(url: str, clients=100) -> float:
    """Seconds until `clients` curls started at once have all downloaded `url`."""
    started = time.monotonic()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", url]) for _ in range(clients)]
    assert all(p.wait() == 0 for p in procs)
    return time.monotonic() - started


def peak_rss(b: Bench, results: list):
    """5. Peak RSS while 8 clients stream the big NAR, cold then warm."""
    b.start_sidecar(fresh=True)
    url = b.url("sidecar", nar_url_of(b, "sidecar", b.big))
    crowd_seconds(url, 8)
    cold_rss = b.peak_rss_mib()
    crowd_seconds(url, 8)
    warm_rss = b.peak_rss_mib()
    results.append(("5. peak RSS, 8 x big NAR cold+warm, MiB", warm_rss, "limit", 100.0, "<= 100 MiB"))
    print(f"# peak RSS after cold: {cold_rss:.1f} MiB, after cold+warm: {warm_rss:.1f} MiB")


CROWD = int(os.environ.get("BENCH_CROWD", "256"))


def crowd_cold(b: Bench, results: list):
    """8. Peak RSS while CROWD clients each download a different cold 2 MiB NAR, all at once,
    from an upstream that sends each at 1 MiB/s (so every download is in flight together);
    then RSS and threads a minute after the load ended."""
    if not hasattr(b, "crowd"):
        b.crowd = [write_nar(b.cache, f"crowd{i}", 2 << 20) for i in range(CROWD)]
    b.start_sidecar(fresh=True, upstream_path="/slow")
    urls = [b.url("sidecar", nar_url_of(b, "sidecar", h)) for h in b.crowd]
    baseline = b.rss_mib()
    started = time.monotonic()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", u]) for u in urls]
    peak_threads = 0
    while any(p.poll() is None for p in procs):
        peak_threads = max(peak_threads, b.threads())
        time.sleep(0.05)
    assert all(p.returncode == 0 for p in procs)
    took = time.monotonic() - started
    peak = b.peak_rss_mib()
    time.sleep(60)
    after = b.rss_mib()
    print(f"# {CROWD} cold downloads in {took:.1f} s: RSS {baseline:.1f} MiB before, peak {peak:.1f} MiB, "
          f"{after:.1f} MiB a minute later; threads peak {peak_threads}, {b.threads()} a minute later")
    results.append((f"8. peak RSS, {CROWD} concurrent cold NARs, MiB", peak, "limit", 100.0, "<= 100 MiB"))
    results.append((f"8b. RSS a minute after, MiB", after, "limit", 40.0, "<= 40 MiB"))


NIX_PATHS = int(os.environ.get("BENCH_NIX_PATHS", "300"))
NIX_MIB = int(os.environ.get("BENCH_NIX_MIB", "1024"))
NIX_CONFIG = "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =\n"


# Current Nix (Debian trixie's 2.26) in the root scripts/test.sh makes; scenario 6 runs with it
# too when it is there. It runs under chroot, with /proc, /dev and /tmp (where the bench works)
# bound in, in the same network namespace.
NIX226_ROOT = os.environ.get("NIX_SIDECAR_NIX226_ROOT", "/var/tmp/nix-sidecar-nix226")
IN_ROOT = r'''root=$1; home=$2; config=$3; shift 3
mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" && mount --rbind /tmp "$root/tmp" || exit 97
exec chroot "$root" env -i HOME="$home" XDG_CACHE_HOME="$home/xdg-cache" PATH=/usr/bin:/bin NIX_CONFIG="$config" "$@"'''


def clients() -> list:
    """The Nix clients to measure: the host's (2.8), and 2.26 when its root is there."""
    found = ["2.8"]
    if os.path.exists(os.path.join(NIX226_ROOT, "usr/bin/nix")) and os.geteuid() == 0:
        found.append("2.26")
    return found


def nix(args: list, home: str, cacert: str = None, client: str = "2.8") -> str:
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG, "HOME": home, "XDG_CACHE_HOME": os.path.join(home, "xdg-cache")}
    if cacert:
        env["NIX_SSL_CERT_FILE"] = cacert
    if client == "2.26":
        extra = [f"NIX_SSL_CERT_FILE={cacert}"] if cacert else []
        args = ["unshare", "-m", "sh", "-c", IN_ROOT, "sh", NIX226_ROOT, home, NIX_CONFIG] + extra + args
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def nix_closure(b: Bench) -> tuple:
    """The chain (built once per run: a second build would sign with a new key paths the
    binary cache already holds signed with the first)."""
    if not hasattr(b, "chain"):
        b.chain = build_chain(b)
    return b.chain


def build_chain(b: Bench) -> tuple:
    """Builds NIX_PATHS store paths of NIX_MIB in all (random bytes; ten roots, the rest each
    referring to one root) under one top path, and adds them, signed and uncompressed, to the
    binary cache the upstream and nginx static serve. Returns (top path, public key)."""
    home = os.path.join(b.work, "nix-home")
    os.makedirs(home, exist_ok=True)
    size = (NIX_MIB << 20) // NIX_PATHS
    expr = os.path.join(home, "closure.nix")
    with open(expr, "w") as f:
        f.write(f"""
let
  leaf = i: deps: builtins.derivation {{
    name = "bench-leaf-${{toString i}}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "/usr/bin/head -c {size} /dev/urandom > $out; echo ${{builtins.concatStringsSep " " deps}} >> $out" ];
  }};
  roots = builtins.genList (i: leaf i [ ]) 10;
  rest = builtins.genList (i: leaf (i + 10) [ (builtins.elemAt roots (i - i / 10 * 10)) ]) ({NIX_PATHS} - 10);
in builtins.derivation {{
  name = "bench-top";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${{builtins.concatStringsSep " " (roots ++ rest)}} > $out" ];
}}
""")
    top = nix(["nix-build", "--no-out-link", expr], home).strip()
    sk, pk = os.path.join(home, "sk"), os.path.join(home, "pk")
    nix(["nix-store", "--generate-binary-cache-key", "bench-1", sk, pk], home)
    nix(["nix", "copy", "--to", f"file://{b.cache}?secret-key={sk}&compression=none", top], home)
    with open(pk) as f:
        return top, f.read().strip()


def nix_copy_seconds(url: str, top: str, public_key: str, work: str, cacert: str = None,
                     client: str = "2.8") -> float:
    """`nix copy --from url` of the closure of `top` into an empty store, with an empty
    narinfo cache; removes the store afterwards."""
    home = tempfile.mkdtemp(dir=work, prefix="nix-client-")
    started = time.monotonic()
    nix(["nix", "copy", "--store", os.path.join(home, "store"), "--from", url,
         "--option", "trusted-public-keys", public_key, top], home, cacert, client)
    seconds = time.monotonic() - started
    subprocess.run(["chmod", "-R", "u+w", home], check=True)
    shutil.rmtree(home)
    return seconds


def real_nix(b: Bench, results: list):
    """6. Real Nix copying a closure of NIX_PATHS paths and NIX_MIB: warm nix-sidecar vs
    nginx static, cold nix-sidecar vs straight from the upstream and vs a cold nginx
    proxy_cache in front of the same upstream (the same job without the hash check and the
    fsync). Also the CPU time every process took in the cold and the direct copy: on a small
    machine they share the cores."""
    if not shutil.which("nix-build"):
        raise SystemExit("needs nix: apt-get install -y nix-bin")
    print(f"# building a closure of {NIX_PATHS} paths, {NIX_MIB} MiB", flush=True)
    top, public_key = nix_closure(b)
    for client in clients():
        real_nix_with(b, results, top, public_key, client)


def real_nix_with(b: Bench, results: list, top: str, public_key: str, client: str):
    cold, warm, static, direct, proxied = [], [], [], [], []
    cold_cpu, direct_cpu, proxied_cpu = [], [], []
    copy = lambda url, cacert=None: nix_copy_seconds(url, top, public_key, b.work, cacert, client)
    for _ in range(max(3, ROUNDS // 2)):
        b.start_sidecar(fresh=True)
        with CpuMeter(b) as cpu:
            cold.append(copy(b.url("sidecar", "")))
        cold_cpu.append(cpu.seconds)
        warm.append(copy(b.url("sidecar", "")))
        static.append(copy(b.url("static", "")))
        with CpuMeter(b) as cpu:
            direct.append(copy(b.url("upstream", ""), b.cert))
        direct_cpu.append(cpu.seconds)
        b.stop_sidecar()
        # Each round a cache of its own under nginx's /cold-N/, so every copy through it is cold.
        b.nginx_cold = getattr(b, "nginx_cold", 0) + 1
        with CpuMeter(b) as cpu:
            proxied.append(copy(b.url("proxy", f"cold-{b.nginx_cold}")))
        proxied_cpu.append(cpu.seconds)
    what = f"{NIX_PATHS + 1} paths, {NIX_MIB} MiB, Nix {client}"
    results.append((f"6. real Nix, warm, {what}, s", median(warm), "nginx static", median(static), "<= 1.15"))
    results.append((f"6b. real Nix, cold, {what}, s", median(cold), "direct upstream (TLS)", median(direct), "<= 1.3"))
    total = lambda runs: median([sum(r.values()) for r in runs])
    results.append((f"6c. real Nix {client}, cold, CPU s of all processes", total(cold_cpu), "direct upstream (TLS)", total(direct_cpu), "(info)"))
    results.append((f"6d. real Nix, cold, {what}, s", median(cold), "nginx proxy_cache, cold", median(proxied), "(info)"))
    part = lambda runs, who: median([r.get(who, 0.0) for r in runs])
    for label, runs in [("cold", cold_cpu), ("direct", direct_cpu), ("nginx proxy_cache cold", proxied_cpu)]:
        print(f"# Nix {client}: CPU s per {label} copy: " + ", ".join(f"{who} {part(runs, who):.2f}" for who in ["nix", "nginx", "nix-sidecar"]))


class DelayingProxy:
    """The WAN of scenario 9, in user space: an HTTP/1.1 relay in front of one of nginx's
    servers that holds every request for WAN_DELAY_S before passing it on (one round trip to a
    distant cache), keep-alive included. The rate per connection is nginx's `limit_rate`."""

    def __init__(self, target_port: int):
        self.target = target_port
        # Response bytes of NAR requests (`/nar/` in the path) that crossed it.
        self.nar_bytes = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.relay, args=(client,), daemon=True).start()

    @staticmethod
    def head(sock, buf: bytes):
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return None, b""
            buf += data
        end = buf.index(b"\r\n\r\n") + 4
        return buf[:end], buf[end:]

    def relay(self, client):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = socket.create_connection(("127.0.0.1", self.target))
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe_r, pipe_w = os.pipe()
        pending = b""
        try:
            while True:
                request, pending = self.head(client, pending)
                if request is None:
                    return
                time.sleep(WAN_DELAY_S)
                upstream.sendall(request)
                response, body = self.head(upstream, b"")
                if response is None:
                    return
                lines = response.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                length = next((int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length:")), 0)
                if request.startswith(b"HEAD") or status in (204, 304):
                    length = 0
                if b"/nar/" in request.split(b"\r\n", 1)[0]:
                    with self.lock:
                        self.nar_bytes += length
                left = length - len(body)
                # Head and the body read with it in one write: two small writes would wait
                # for the client's delayed ACK (Nagle), doubling the round trip.
                client.sendall(response + body[:length])
                # The rest moves in the kernel (socket -> pipe -> socket), outside Python's
                # lock, so the relay is not what limits the rate.
                while left > 0:
                    n = os.splice(upstream.fileno(), pipe_w, min(left, 1 << 20))
                    if n == 0:
                        return
                    left -= n
                    while n > 0:
                        n -= os.splice(pipe_r, client.fileno(), n)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()
            os.close(pipe_r)
            os.close(pipe_w)


def split_closure(b: Bench, top: str) -> None:
    """Puts the closure's narinfos and NARs, alternately, into the caches of the two WAN
    upstreams (each path in exactly one of them)."""
    home = os.path.join(b.work, "nix-home")
    paths = sorted(nix(["nix-store", "-qR", top], home).split())
    for name in ["wan-a", "wan-b"]:
        os.makedirs(os.path.join(b.work, name, "nar"), exist_ok=True)
        with open(os.path.join(b.work, name, "nix-cache-info"), "w") as f:
            f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    for i, path in enumerate(paths):
        dest = os.path.join(b.work, "wan-a" if i % 2 == 0 else "wan-b")
        h = os.path.basename(path)[:32]
        narinfo = os.path.join(b.cache, f"{h}.narinfo")
        with open(narinfo) as f:
            url = next(l.split(": ", 1)[1].strip() for l in f if l.startswith("URL: "))
        for rel in [f"{h}.narinfo", url]:
            target = os.path.join(dest, rel)
            if not os.path.exists(target):
                os.link(os.path.join(b.cache, rel), target)


def nix_seconds(args: list, work: str, cacert: str = None, client: str = "2.8") -> float:
    """A Nix command run against an empty store (removed afterwards); its wall time."""
    home = tempfile.mkdtemp(dir=work, prefix="nix-client-")
    started = time.monotonic()
    nix(args + ["--store", os.path.join(home, "store")], home, cacert, client)
    seconds = time.monotonic() - started
    subprocess.run(["chmod", "-R", "u+w", home], check=True)
    shutil.rmtree(home)
    return seconds


def wan(b: Bench, results: list):
    """9. Two upstreams behind a WAN (WAN_DELAY_S per request, WAN_UPSTREAM_MIB per
    connection), the closure split between them: Nix with both as substituters against Nix
    through a cold nix-sidecar (racing, lookahead), for a closure walk (`nix-store --realise
    --dry-run`: narinfos only) and a real copy (`nix-store --realise`); then a copy after
    `nix-sidecar prefetch` against one from a warm cache."""
    print(f"# WAN: {WAN_DELAY_S * 1000:.0f} ms per request, {WAN_UPSTREAM_MIB} MiB/s per connection, two upstreams", flush=True)
    top, public_key = nix_closure(b)
    split_closure(b, top)
    proxies = [DelayingProxy(b.ports[name]) for name in ["wan-a", "wan-b"]]
    direct_subs = " ".join(f"http://127.0.0.1:{p.port}" for p in proxies)
    sidecar_subs = b.url("sidecar", "").rstrip("/")
    config = os.path.join(b.work, "wan-sidecar.toml")

    def start_sidecar(prefetch_nars=False):
        b.stop_sidecar()
        cache_dir = os.path.join(b.work, "wan-sidecar-cache")
        shutil.rmtree(cache_dir, ignore_errors=True)
        with open(config, "w") as f:
            f.write(f'listen = ["127.0.0.1:{b.ports["sidecar"]}"]\ncache-dir = "{cache_dir}"\n'
                    f'min-free-space = "1GiB"\nmax-cache-size = "50GiB"\n')
            for i, p in enumerate(proxies):
                f.write(f'[[upstream]]\nname = "wan-{i}"\nurl = "http://127.0.0.1:{p.port}"\n'
                        f'prefetch-nars = {"true" if prefetch_nars else "false"}\n')
        log = open(os.path.join(b.work, "sidecar.log"), "a")
        b.sidecar = subprocess.Popen([os.path.join(ROOT, "target/release/nix-sidecar"), "serve", "--config", config],
                                     stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "NIX_SIDECAR_LOG": "warn"})
        for _ in range(3000):
            try:
                urllib.request.urlopen(b.url("sidecar", "nix-cache-info"), timeout=1).read()
                return
            except Exception:
                time.sleep(0.01)
        raise SystemExit("nix-sidecar did not start")

    def realise(subs: str, dry: bool) -> float:
        args = ["nix-store", "--realise", top, "--option", "substituters", subs,
                "--option", "trusted-public-keys", public_key]
        return nix_seconds(args + (["--dry-run"] if dry else []), b.work)

    walk_direct, walk_sidecar, copy_direct, copy_sidecar, copy_eager, prefetched, warm = [], [], [], [], [], [], []
    for _ in range(max(3, ROUNDS // 2)):
        walk_direct.append(realise(direct_subs, True))
        start_sidecar()
        walk_sidecar.append(realise(sidecar_subs, True))
        copy_direct.append(realise(direct_subs, False))
        start_sidecar()
        copy_sidecar.append(realise(sidecar_subs, False))
        warm.append(realise(sidecar_subs, False))
        start_sidecar(prefetch_nars=True)
        copy_eager.append(realise(sidecar_subs, False))
        start_sidecar()
        subprocess.run([os.path.join(ROOT, "target/release/nix-sidecar"), "prefetch", "--url", sidecar_subs, top],
                       check=True, capture_output=True)
        prefetched.append(realise(sidecar_subs, False))
    b.stop_sidecar()
    for p in proxies:
        p.listener.close()
    n = len(nix(["nix-store", "-qR", top], os.path.join(b.work, "nix-home")).split())
    results.append((f"9. WAN, closure walk ({n} paths, narinfos only), s", median(walk_sidecar), "Nix, both upstreams direct", median(walk_direct), "<= 0.6"))
    results.append((f"9b. WAN, cold copy ({n} paths, {NIX_MIB} MiB), s", median(copy_sidecar), "Nix, both upstreams direct", median(copy_direct), "<= 0.9"))
    results.append((f"9b'. the same with `prefetch-nars = true`, s", median(copy_eager), "Nix, both upstreams direct", median(copy_direct), "<= 0.9"))
    results.append((f"9c. WAN, copy after `nix-sidecar prefetch`, s", median(prefetched), "copy from a warm nix-sidecar", median(warm), "<= 1.15"))


class CpuMeter:
    """CPU seconds (user + system) that Nix (our children), nginx's workers and nix-sidecar
    take between entering and leaving the block."""
    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, b: Bench):
        self.b = b

    def processes(self) -> dict:
        with open(os.path.join(self.b.work, "nginx.pid")) as f:
            master = f.read().strip()
        with open(f"/proc/{master}/task/{master}/children") as f:
            workers = f.read().split()
        now = {"nginx": sum(self.cpu(pid) for pid in workers)}
        if getattr(self.b, "sidecar", None):
            now["nix-sidecar"] = self.cpu(self.b.sidecar.pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        now["nix"] = children.ru_utime + children.ru_stime
        return now

    def cpu(self, pid) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.TICK

    def __enter__(self):
        self.before = self.processes()
        return self

    def __exit__(self, *_):
        after = self.processes()
        self.seconds = {who: after[who] - self.before.get(who, 0.0) for who in after}


INDEX_ENTRIES = int(os.environ.get("BENCH_INDEX_ENTRIES", "1000000"))
INDEX_STORED = int(os.environ.get("BENCH_INDEX_STORED", "10000"))


def big_index(b: Bench, results: list):
    """7. Start-up and narinfo lookups with a million narinfos (and their NARs) in the index,
    some NARs stored: the example `fill_index` writes them through the store's own API."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "fill_index"], cwd=ROOT, check=True)
    b.stop_sidecar()
    shutil.rmtree(os.path.join(b.work, "big-index"), ignore_errors=True)
    config = b.sidecar_config("big-index")
    print(f"# filling an index with {INDEX_ENTRIES} narinfos, {INDEX_STORED} NARs stored", flush=True)
    started = time.monotonic()
    hashes = subprocess.run([os.path.join(ROOT, "target/release/examples/fill_index"), config, str(INDEX_ENTRIES), str(INDEX_STORED)],
                            check=True, capture_output=True, text=True).stdout.split()
    print(f"# filled in {time.monotonic() - started:.0f} s", flush=True)
    # None of these narinfos is on the upstream: a 200 is an answer from the index.
    first = narinfo_path(hashes[0])
    clean, crashed = [], []
    for _ in range(ROUNDS):
        clean.append(b.start_sidecar(fresh=False, cache_name="big-index", ready_path=first))
        b.stop_sidecar(signal.SIGKILL)
        crashed.append(b.start_sidecar(fresh=False, cache_name="big-index", ready_path=first))
        b.stop_sidecar()
    paths_file = os.path.join(b.work, "big-index-paths.txt")
    with open(paths_file, "w") as f:
        f.write("\n".join("/" + narinfo_path(h) for h in hashes) + "\n")
    b.start_sidecar(fresh=False, cache_name="big-index", ready_path=first)
    few = median([wrk_p99_ms(b.url("sidecar", ""), paths_file, 8) for _ in range(3)])
    many = median([wrk_p99_ms(b.url("sidecar", ""), paths_file, 64) for _ in range(3)])
    b.stop_sidecar()
    static_paths = os.path.join(b.work, "paths.txt")  # written by scenario 2, else now
    with open(static_paths, "w") as f:
        f.write("\n".join("/" + narinfo_path(h) for h in b.small) + "\n")
    nginx = median([wrk_p99_ms(b.url("static", ""), static_paths, 64) for _ in range(3)])
    n = f"{INDEX_ENTRIES // 1000}k"
    results.append((f"7. start-up, {n} entries, s", median(clean), "limit", 1.0, "<= 1 s"))
    results.append((f"7b. start-up after SIGKILL, {n} entries, s", median(crashed), "limit", 1.0, "<= 1 s"))
    results.append((f"7c. narinfo lookup p99, {n} entries, 8 connections, ms", few, "limit", 1.0, "<= 1 ms"))
    results.append((f"7d. narinfo lookup p99, {n} entries, 64 connections, ms", many, "nginx static, 64 connections", nginx, "(info)"))


def b64url(data: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def exchange_throughput(b: Bench, results: list):
    """10. `nix-sidecar exchange`: a GitHub-style RS256 token (JWKS cached) for an Attic token,
    64 connections, vs nginx answering the same POST with a fixed body (the HTTP floor)."""
    import json
    w = lambda name: os.path.join(b.work, name)
    run = lambda *cmd: subprocess.run(list(cmd), check=True, capture_output=True)
    os.makedirs(w("issuer"), exist_ok=True)
    run("openssl", "genrsa", "-out", w("issuer.key"), "2048")
    modulus = run("openssl", "rsa", "-in", w("issuer.key"), "-noout", "-modulus").stdout.decode().strip().split("=")[1]
    issuer = f"http://127.0.0.1:{b.ports['static']}/issuer"
    with open(w("issuer/.well-known-openid-configuration"), "w") as f:
        f.write(json.dumps({"issuer": issuer, "jwks_uri": f"{issuer}/jwks.json"}))
    os.makedirs(w("issuer/.well-known"), exist_ok=True)
    shutil.copy(w("issuer/.well-known-openid-configuration"), w("issuer/.well-known/openid-configuration"))
    with open(w("issuer/jwks.json"), "w") as f:
        f.write(json.dumps({"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig",
                                      "n": b64url(bytes.fromhex(modulus)), "e": "AQAB"}]}))
    now = int(time.time())
    header = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench"}).encode())
    claims = b64url(json.dumps({"iss": issuer, "aud": "https://cache.bench", "sub": "repo:org/app:ref:refs/heads/main",
                                "repository": "org/app", "ref": "refs/heads/main", "iat": now, "nbf": now - 5,
                                "exp": now + 3600}).encode())
    with open(w("jwt.in"), "w") as f:
        f.write(f"{header}.{claims}")
    signature = run("openssl", "dgst", "-sha256", "-sign", w("issuer.key"), w("jwt.in")).stdout
    token = f"{header}.{claims}.{b64url(signature)}"
    with open(w("exchange.key"), "w") as f:
        f.write(__import__("base64").b64encode(os.urandom(32)).decode())
    with open(w("exchange.toml"), "w") as f:
        f.write(f'listen = "127.0.0.1:{b.ports["exchange"]}"\nsigning-key-file = "{w("exchange.key")}"\n'
                f'rate-limit = 4000000000\n[[issuer]]\nurl = "{issuer}"\naudience = "https://cache.bench"\n'
                f'[[rule]]\nissuer = "{issuer}"\nclaims = {{ repository = "org/*", ref = "refs/heads/main" }}\n'
                f'grant = {{ "org-*" = ["pull"], "org-ci" = ["pull", "push"] }}\n')
    binary = os.environ.get("BENCH_SIDECAR_BIN", os.path.join(ROOT, "target/release/nix-sidecar"))
    proc = subprocess.Popen([binary, "exchange", "--config", w("exchange.toml")], stdout=subprocess.DEVNULL,
                            stderr=open(w("exchange.log"), "a"), env={**os.environ, "NIX_SIDECAR_LOG": "warn"})
    form = ("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
            f"&subject_token={token}&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&scope=pull")
    script = w("exchange.lua")
    with open(script, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = "{form}"\n'
                'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n')
    url = f"http://127.0.0.1:{b.ports['exchange']}/token"
    try:
        for _ in range(100):
            try:
                req = urllib.request.Request(url, data=form.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"})
                answer = json.loads(urllib.request.urlopen(req, timeout=1).read())
                assert answer["token_type"] == "Bearer"
                break
            except Exception:
                time.sleep(0.05)
        else:
            raise SystemExit("the exchange did not start or refused the token: see exchange.log")

        # The same at an offered load of about 5,000/s: each connection waits 12 ms between
        # requests (wrk counts latency from sending), so p99 is the service's, not a queue's.
        paced = w("exchange-paced.lua")
        with open(paced, "w") as f:
            f.write(open(script).read() + "function delay() return 12 end\n")

        def measure(target: str, lua: str = script):
            out = subprocess.run(["wrk", "-t2", "-c64", "-d5s", "--latency", "-s", lua, target],
                                 check=True, capture_output=True, text=True).stdout
            if "Non-2xx" in out:
                raise SystemExit(f"exchanges failed:\n{out}")
            rps = float(next(l for l in out.splitlines() if l.startswith("Requests/sec:")).split()[1])
            p99 = next(l.split()[1] for l in out.splitlines() if l.strip().startswith("99%"))
            unit = next(u for u in ["us", "ms", "s"] if p99.endswith(u))
            return rps, float(p99[: -len(unit)]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

        ours, floor, ours_paced, floor_paced = [], [], [], []
        for _ in range(ROUNDS):
            ours.append(measure(url))
            floor.append(measure(b.url("static", "token")))
            ours_paced.append(measure(url, paced))
            floor_paced.append(measure(b.url("static", "token"), paced))
    finally:
        proc.terminate()
        proc.wait()
    rps = median([r for r, _ in ours])
    p99 = median([p for _, p in ours])
    results.append(("10. exchanges/s, RS256, JWKS cached, 64 connections", rps, "nginx fixed answer", median([r for r, _ in floor]), ">= 5,000/s"))
    results.append(("10b. exchange p99, 64 connections flat out, ms", p99, "nginx fixed answer", median([p for _, p in floor]), "(info)"))
    results.append((f"10c. exchange p99, 64 connections, ~{median([r for r, _ in ours_paced]):.0f}/s offered, ms",
                    median([p for _, p in ours_paced]), "nginx fixed answer", median([p for _, p in floor_paced]), "<= 5 ms"))


def system_closure(b: Bench) -> tuple:
    """The system-shaped closure, built once per run (see `nix_closure`)."""
    if not hasattr(b, "system"):
        b.system = build_system(b)
    return b.system


def build_system(b: Bench) -> tuple:
    """A closure shaped like a system's: SYSTEM_LEVELS levels of SYSTEM_WIDTH paths of about
    SYSTEM_KIB KiB each, every path referring to the hub (one path all refer to, as glibc is)
    and to two paths of the level below; a top path above them all. Added, signed and
    uncompressed, to the binary cache. Returns (top path, public key, number of paths)."""
    home = os.path.join(b.work, "system-home")
    os.makedirs(home, exist_ok=True)
    expr = os.path.join(home, "system.nix")
    with open(expr, "w") as f:
        f.write(f"""
let
  mk = name: deps: builtins.derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "/usr/bin/head -c {SYSTEM_KIB * 1024} /dev/urandom > $out; echo ${{builtins.concatStringsSep " " deps}} >> $out" ];
  }};
  hub = mk "sys-hub" [ ];
  level = l: below: builtins.genList (i: mk "sys-${{toString l}}-${{toString i}}"
    ([ hub ] ++ (if below == [ ] then [ ] else [ (builtins.elemAt below (i - i / {SYSTEM_WIDTH} * {SYSTEM_WIDTH})) (builtins.elemAt below ({SYSTEM_WIDTH} - 1 - i)) ]))) {SYSTEM_WIDTH};
  levels = builtins.foldl' (acc: l: [ (level l (if acc == [ ] then [ ] else builtins.head acc)) ] ++ acc) [ ] (builtins.genList (l: {SYSTEM_LEVELS} - l) {SYSTEM_LEVELS});
in mk "sys-top" (builtins.head levels)
""")
    top = nix(["nix-build", "--no-out-link", expr], home).strip()
    count = len(nix(["nix-store", "-qR", top], home).split())
    sk, pk = os.path.join(home, "sk"), os.path.join(home, "pk")
    nix(["nix-store", "--generate-binary-cache-key", "bench-sys-1", sk, pk], home)
    nix(["nix", "copy", "--to", f"file://{b.cache}?secret-key={sk}&compression=none", top], home)
    with open(pk) as f:
        return top, f.read().strip(), count


SYSTEM_LEVELS = int(os.environ.get("BENCH_SYSTEM_LEVELS", "15"))
SYSTEM_WIDTH = int(os.environ.get("BENCH_SYSTEM_WIDTH", "40"))
SYSTEM_KIB = int(os.environ.get("BENCH_SYSTEM_KIB", "60"))


def system_deploy(b: Bench, results: list):
    """11. A system-shaped closure realised the way a deploy does (`nix-store --realise` with 16
    jobs), with each client: cold nix-sidecar vs Nix straight to the upstream, warm vs nginx
    static. All on loopback."""
    print(f"# building a system-shaped closure ({SYSTEM_LEVELS} levels of {SYSTEM_WIDTH})", flush=True)
    top, key, count = system_closure(b)
    for client in clients():
        def realise(url, cacert=None):
            return nix_seconds(["nix-store", "--realise", top, "--option", "substituters", url,
                                "--option", "trusted-public-keys", key, "--max-jobs", "16",
                                "--option", "max-substitution-jobs", "16"], b.work, cacert, client)
        cold, warm, static, direct = [], [], [], []
        for _ in range(max(3, ROUNDS // 2)):
            b.start_sidecar(fresh=True)
            cold.append(realise(b.url("sidecar", "")))
            warm.append(realise(b.url("sidecar", "")))
            static.append(realise(b.url("static", "")))
            direct.append(realise(b.url("upstream", ""), b.cert))
        b.stop_sidecar()
        what = f"{count} paths, system-shaped, Nix {client}"
        results.append((f"11. deploy (realise, 16 jobs), cold, {what}, s", median(cold), "direct upstream (TLS)", median(direct), "<= 1.3"))
        results.append((f"11b. deploy, warm, {what}, s", median(warm), "nginx static", median(static), "<= 1.1"))


def current_nix_wan(b: Bench, results: list):
    """13. The two shapes a deploy pulls, behind one cache across a WAN (WAN_DELAY_S per
    request, WAN_UPSTREAM_MIB per connection), with each client at its defaults: the chain
    with `nix copy`, the system-shaped closure with `nix-store --realise` (16 jobs); a cold
    nix-sidecar (built-in defaults) against Nix straight to the cache."""
    print(f"# WAN, one cache: {WAN_DELAY_S * 1000:.0f} ms per request, {WAN_UPSTREAM_MIB} MiB/s per connection", flush=True)
    chain_top, chain_key = nix_closure(b)
    system_top, system_key, count = system_closure(b)
    proxy = DelayingProxy(b.ports["static"])
    direct = f"http://127.0.0.1:{proxy.port}/wan-all"
    sidecar = b.url("sidecar", "").rstrip("/")
    for client in clients():
        def copy(url):
            return nix_copy_seconds(url, chain_top, chain_key, b.work, client=client)

        def deploy(url):
            return nix_seconds(["nix-store", "--realise", system_top, "--option", "substituters", url,
                                "--option", "trusted-public-keys", system_key, "--max-jobs", "16",
                                "--option", "max-substitution-jobs", "16"], b.work, client=client)
        runs = {"chain": ([], []), "system": ([], [])}
        for _ in range(max(3, ROUNDS // 2)):
            for shape, run in [("chain", copy), ("system", deploy)]:
                b.start_sidecar(fresh=True, upstream_url=direct)
                runs[shape][0].append(run(sidecar))
                runs[shape][1].append(run(direct))
        b.stop_sidecar()
        results.append((f"13. WAN, chain ({NIX_PATHS + 1} paths, {NIX_MIB} MiB), `nix copy`, cold, Nix {client}, s",
                        median(runs["chain"][0]), "Nix straight to the cache", median(runs["chain"][1]), "<= 0.5"))
        results.append((f"13b. WAN, system-shaped ({count} paths), realise 16 jobs, cold, Nix {client}, s",
                        median(runs["system"][0]), "Nix straight to the cache", median(runs["system"][1]), "<= 0.5"))
    proxy.listener.close()


FLEET = int(os.environ.get("BENCH_FLEET", "4"))


def start_extra_sidecar(b: Bench, name: str, config: str) -> tuple:
    """Another nix-sidecar (a fleet's machine or site) with `config` beside its own listen
    and cache-dir; returns (process, URL)."""
    port = free_port()
    cache_dir = os.path.join(b.work, f"{name}-cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    path = os.path.join(b.work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'listen = ["127.0.0.1:{port}"]\ncache-dir = "{cache_dir}"\nmin-free-space = "1GiB"\n'
                f'max-cache-size = "50GiB"\n{config}')
    log = open(os.path.join(b.work, f"{name}.log"), "a")
    proc = subprocess.Popen([os.path.join(ROOT, "target/release/nix-sidecar"), "serve", "--config", path],
                            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "NIX_SIDECAR_LOG": "warn"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            urllib.request.urlopen(url + "/nix-cache-info", timeout=1).read()
            return proc, url
        except Exception:
            time.sleep(0.01)
    raise SystemExit(f"{name} did not start")


def fleet(b: Bench, results: list):
    """14. A fleet of FLEET machines at one site behind a WAN (WAN_DELAY_S per request,
    WAN_UPSTREAM_MIB per connection), each its own nix-sidecar and its own cache, realising
    the system-shaped closure one after another (16 jobs, Nix 2.26 when there): NAR bytes that
    cross the WAN, and each later machine's time, with a site cache against without one."""
    top, key, count = system_closure(b)
    client = clients()[-1]
    proxy = DelayingProxy(b.ports["static"])
    upstream = f"http://127.0.0.1:{proxy.port}/wan-all"
    runs, walks, walks_direct = {}, [], []

    def realise(url, dry=False):
        return nix_seconds(["nix-store", "--realise", top, "--option", "substituters", url,
                            "--option", "trusted-public-keys", key, "--max-jobs", "16",
                            "--option", "max-substitution-jobs", "16"] + (["--dry-run"] if dry else []),
                           b.work, client=client)
    for with_site in [False, True]:
        procs, extra = [], ""
        if with_site:
            site_port = free_port()
            site, _ = start_extra_sidecar(b, "site", f'[site]\nlisten = ["127.0.0.1:{site_port}"]\n'
                                                     f'[[upstream]]\nname = "up"\nurl = "{upstream}"\n')
            procs.append(site)
            extra = f'site = "http://127.0.0.1:{site_port}"\n'
        before = proxy.nar_bytes
        seconds = []
        for m in range(FLEET):
            machine, url = start_extra_sidecar(b, f"machine-{m}", f'[[upstream]]\nname = "up"\nurl = "{upstream}"\n{extra}')
            procs.append(machine)
            seconds.append(realise(url))
        runs[with_site] = (proxy.nar_bytes - before, seconds)
        if with_site:
            # A closure walk (narinfos only, `--dry-run`) by a machine after the first, through
            # its own cold sidecar, against Nix walking the upstream itself.
            for w in range(max(3, ROUNDS // 2)):
                machine, url = start_extra_sidecar(b, f"walker-{w}", f'[[upstream]]\nname = "up"\nurl = "{upstream}"\n{extra}')
                procs.append(machine)
                walks.append(realise(url, dry=True))
                walks_direct.append(realise(upstream, dry=True))
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait()
    proxy.listener.close()
    # Bytes of the NARs the closure holds (the binary cache has the chain's too: count ours).
    home = os.path.join(b.work, "system-home")
    paths = nix(["nix-store", "-qR", top], home).split()
    closure_bytes = 0
    for path in paths:
        with open(os.path.join(b.cache, f"{os.path.basename(path)[:32]}.narinfo")) as f:
            closure_bytes += int(next(l.split(": ", 1)[1] for l in f if l.startswith("FileSize: ")))
    (site_bytes, site_s), (alone_bytes, alone_s) = runs[True], runs[False]
    what = f"{FLEET} machines, {count} paths, Nix {client}"
    results.append((f"14. fleet over the WAN, upstream NAR bytes / closure, {what}", site_bytes / closure_bytes,
                    "without a site", alone_bytes / closure_bytes, "<= 1.1 (site)"))
    results.append((f"14b. fleet, machines after the first, realise, s", median(site_s[1:]),
                    "each machine straight (cold sidecar)", median(alone_s[1:]), "(info)"))
    results.append((f"14c. fleet, a later machine's closure walk (narinfos only), s", median(walks),
                    "Nix walking the upstream itself", median(walks_direct), "<= 0.25"))


DEEP = int(os.environ.get("BENCH_DEEP", "301"))


def deep_chain(b: Bench) -> tuple:
    """DEEP paths of 4 KiB, each referring to the one before (a closure as deep as it is
    long), signed into the binary cache; (top path, public key, every path)."""
    if hasattr(b, "deep"):
        return b.deep
    home = os.path.join(b.work, "deep-home")
    os.makedirs(home, exist_ok=True)
    expr = os.path.join(home, "deep.nix")
    with open(expr, "w") as f:
        f.write(f"""
let
  mk = n: builtins.derivation {{
    name = "deep-${{toString n}}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "/usr/bin/head -c 4096 /dev/urandom > $out; echo ${{if n == 0 then "" else toString (mk (n - 1))}} >> $out" ];
  }};
in mk {DEEP - 1}
""")
    top = nix(["nix-build", "--no-out-link", expr], home).strip()
    paths = nix(["nix-store", "-qR", top], home).split()
    sk, pk = os.path.join(home, "sk"), os.path.join(home, "pk")
    nix(["nix-store", "--generate-binary-cache-key", "bench-deep-1", sk, pk], home)
    nix(["nix", "copy", "--to", f"file://{b.cache}?secret-key={sk}&compression=none", top], home)
    with open(pk) as f:
        b.deep = (top, f.read().strip(), paths)
    return b.deep


def prefetch_paths_from(b: Bench, results: list):
    """15. `nix-sidecar prefetch` of a DEEP-deep chain behind the WAN into a cold sidecar: the
    whole closure list (`--paths-from -`, as `nix path-info -r` on the builder prints it)
    against the root alone (found level by level through References)."""
    top, _key, paths = deep_chain(b)
    proxy = DelayingProxy(b.ports["static"])
    upstream = f"http://127.0.0.1:{proxy.port}/wan-all"
    cli = os.path.join(ROOT, "target/release/nix-sidecar")
    listed, root_only = [], []
    for _ in range(max(3, ROUNDS // 2)):
        for mode in ["list", "root"]:
            b.start_sidecar(fresh=True, upstream_url=upstream)
            url = b.url("sidecar", "").rstrip("/")
            started = time.monotonic()
            if mode == "list":
                subprocess.run([cli, "prefetch", "--url", url, "--paths-from", "-"], input="\n".join(paths),
                               text=True, check=True, capture_output=True)
                listed.append(time.monotonic() - started)
            else:
                subprocess.run([cli, "prefetch", "--url", url, top], check=True, capture_output=True)
                root_only.append(time.monotonic() - started)
    b.stop_sidecar()
    proxy.listener.close()
    results.append((f"15. prefetch of a {DEEP}-deep chain over the WAN, `--paths-from`, s", median(listed),
                    "the root only", median(root_only), "<= 0.2"))


def stale_redeploy(b: Bench, results: list):
    """16. One machine re-deploys a DEEP-deep chain it knows, its narinfos gone stale
    (`narinfo-ttl` passed), behind the WAN: Nix's walk (`nix-store --realise --dry-run`)
    against the same walk through a cold sidecar."""
    top, key, _paths = deep_chain(b)
    proxy = DelayingProxy(b.ports["static"])
    upstream = f"http://127.0.0.1:{proxy.port}/wan-all"
    client = clients()[-1]
    ttl = 3

    def walk():
        return nix_seconds(["nix-store", "--realise", top, "--dry-run", "--option", "substituters",
                            b.url("sidecar", "").rstrip("/"), "--option", "trusted-public-keys", key],
                           b.work, client=client)
    cold, stale = [], []
    for _ in range(max(3, ROUNDS // 2)):
        b.start_sidecar(fresh=True, upstream_url=upstream, extra=f'narinfo-ttl = "{ttl}s"\n')
        cold.append(walk())
        time.sleep(ttl + 0.5)
        stale.append(walk())
    b.stop_sidecar()
    proxy.listener.close()
    results.append((f"16. re-deploy of a known {DEEP}-deep chain gone stale, walk, Nix {client}, s", median(stale),
                    "the same walk, cold", median(cold), "<= 0.3"))


SCENARIOS = {"1": warm_nar, "2": warm_narinfo, "3": cold_nar, "4": herd, "5": peak_rss, "6": real_nix,
             "7": big_index, "8": crowd_cold, "9": wan, "10": exchange_throughput,
             "11": system_deploy, "12": hit_path,
             "13": current_nix_wan, "14": fleet, "15": prefetch_paths_from,
             "16": stale_redeploy}


def main():
    for tool in ["nginx", "wrk", "curl", "openssl"]:
        if not shutil.which(tool):
            raise SystemExit(f"needs {tool}: apt-get install -y nginx-light wrk curl openssl")
    only = os.environ.get("BENCH_ONLY", ",".join(SCENARIOS)).split(",")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="nix-sidecar-bench-")
    b = Bench(work)
    results = []
    try:
        b.setup()
        for key in only:
            SCENARIOS[key](b, results)
    finally:
        b.teardown()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        # Also when a scenario failed: the ones before it are not lost.
        print()
        print("| scenario | nix-sidecar | peer | peer value | ratio | target |")
        print("|---|---|---|---|---|---|")
        for name, ours, peer, theirs, target in results:
            print(f"| {name} | {number(ours)} | {peer} | {number(theirs)} | {ours / theirs:.2f} | {target} |")


if __name__ == "__main__":
    main()
