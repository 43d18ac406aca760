//! Counters and latency histograms in the Prometheus text format, names prefixed
//! `nix_sidecar_`. Small and dependency-free: a map of series behind a mutex, which is far
//! from the cost of any request it counts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
    histograms: Mutex<BTreeMap<(&'static str, String), Histogram>>,
}

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    inner.join(",")
}

impl Metrics {
    pub fn inc(&self, name: &'static str, pairs: &[(&str, &str)], by: u64) {
        *self
            .counters
            .lock()
            .unwrap()
            .entry((name, labels(pairs)))
            .or_default() += by;
    }

    pub fn observe(&self, name: &'static str, pairs: &[(&str, &str)], value: Duration) {
        let secs = value.as_secs_f64();
        let mut map = self.histograms.lock().unwrap();
        let h = map.entry((name, labels(pairs))).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn observe_upstream(&self, upstream: &str, status: u16, elapsed: Duration) {
        let status = if status == 0 {
            "error".to_string()
        } else {
            status.to_string()
        };
        self.inc(
            "upstream_requests_total",
            &[("upstream", upstream), ("status", &status)],
            1,
        );
        self.observe(
            "upstream_request_seconds",
            &[("upstream", upstream)],
            elapsed,
        );
    }

    /// The exposition text; `extra` are `(name, type, labels, value)` series whose current
    /// values live elsewhere (the store, identities).
    pub fn render(&self, extra: &[(&str, &str, &str, f64)]) -> String {
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), value) in self.counters.lock().unwrap().iter() {
            if *name != last {
                let _ = writeln!(out, "# TYPE nix_sidecar_{name} counter");
                last = name;
            }
            let _ = writeln!(out, "nix_sidecar_{name}{{{labels}}} {value}");
        }
        for ((name, labels), h) in self.histograms.lock().unwrap().iter() {
            let _ = writeln!(out, "# TYPE nix_sidecar_{name} histogram");
            let sep = if labels.is_empty() { "" } else { "," };
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "nix_sidecar_{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                    h.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "nix_sidecar_{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "nix_sidecar_{name}_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "nix_sidecar_{name}_count{{{labels}}} {}", h.count);
        }
        let mut last = "";
        for (name, kind, labels, value) in extra {
            if *name != last {
                let _ = writeln!(out, "# TYPE nix_sidecar_{name} {kind}");
                last = name;
            }
            let _ = writeln!(out, "nix_sidecar_{name}{{{labels}}} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.inc(
            "requests_total",
            &[("route", "narinfo"), ("status", "200")],
            2,
        );
        m.observe_upstream("org", 200, Duration::from_millis(20));
        let text = m.render(&[("cache_size_bytes", "gauge", "", 42.0)]);
        assert!(text.contains("nix_sidecar_requests_total{route=\"narinfo\",status=\"200\"} 2"));
        assert!(text.contains(
            "nix_sidecar_upstream_request_seconds_bucket{upstream=\"org\",le=\"0.025\"} 1"
        ));
        assert!(text.contains("nix_sidecar_upstream_request_seconds_count{upstream=\"org\"} 1"));
        assert!(text.contains("nix_sidecar_cache_size_bytes{} 42"));
    }
}
