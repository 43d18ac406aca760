//! Every metric the daemon exports, named in this one place, through `prometheus-client`
//! (Prometheus text format 0.0.4, names prefixed `nix_sidecar_`).
//!
//! Events are counted where they happen through the methods below; a counter on the byte
//! path is a plain atomic (no lock, no label formatting). Values that live elsewhere (the
//! cache's size, tokens' lifetimes) are read from a [`Status`] snapshot at scrape time.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::status::Status;

const PREFIX: &str = "nix_sidecar";
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What was looked up in the local cache.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Kind {
    narinfo,
    nar,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: Kind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamMethod {
    upstream: String,
    /// GET and HEAD are pulls; a push's PUT answers once its whole upload is sent, so its
    /// time is kept apart from the pulls' latency.
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamStatus {
    upstream: String,
    /// The HTTP status, or `error` when there was no answer.
    status: String,
}

/// What the site did with a machine's request (`[site]`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SiteOutcome {
    /// Served from the site's cache to a caller the upstream lately answered for it.
    cached,
    /// Asked upstream with the caller's credential, and granted.
    granted,
    /// Asked upstream with the caller's credential, and refused (or missing).
    refused,
    /// A NAR the caller was not granted through the site: passed through, not stored.
    passed_through,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabels {
    kind: Kind,
    outcome: SiteOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubjectLabel {
    subject: String,
}

/// Distinct subjects the site counts bytes for; past it, they count as `other` (a caller
/// choosing subjects must not grow the series without bound).
const SITE_SUBJECTS: usize = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteRouteLabels {
    upstream: String,
    /// `answered` by the site, or `passed_over` for the upstream itself.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    cache_hits: Family<KindLabel, Counter>,
    cache_misses: Family<KindLabel, Counter>,
    bytes_fetched: Counter,
    bytes_served: Counter,
    upstream_body_failures: Counter,
    signature_failures: Family<UpstreamLabel, Counter>,
    upstream_requests: Family<UpstreamStatus, Counter>,
    upstream_seconds: Family<UpstreamMethod, Histogram, fn() -> Histogram>,
    site_answers: Family<SiteLabels, Counter>,
    site_route: Family<SiteRouteLabels, Counter>,
    site_upstream_bytes: Family<SubjectLabel, Counter>,
    site_subjects: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Metrics {
    /// Every series that can be known in advance exists from the start, at 0, so that
    /// `increase()` alerts see the first event.
    pub fn new(upstreams: &[&str]) -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let metrics = Metrics {
            requests: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            bytes_fetched: Counter::default(),
            bytes_served: Counter::default(),
            upstream_body_failures: Counter::default(),
            signature_failures: Family::default(),
            upstream_requests: Family::default(),
            upstream_seconds: Family::new_with_constructor(latency_histogram),
            site_answers: Family::default(),
            site_route: Family::default(),
            site_upstream_bytes: Family::default(),
            site_subjects: Default::default(),
            registry: Registry::default(),
        };
        metrics.register_all(&mut registry);
        metrics.create_zeroes(upstreams);
        Metrics {
            registry,
            ..metrics
        }
    }

    fn register_all(&self, r: &mut Registry) {
        r.register(
            "requests",
            "Requests answered, by route and status",
            self.requests.clone(),
        );
        r.register(
            "cache_hits",
            "Answers from the local cache",
            self.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Lookups the local cache could not answer",
            self.cache_misses.clone(),
        );
        r.register(
            "bytes_fetched",
            "NAR bytes downloaded from upstreams",
            self.bytes_fetched.clone(),
        );
        r.register(
            "bytes_served",
            "NAR bytes sent to clients",
            self.bytes_served.clone(),
        );
        r.register(
            "upstream_body_failures",
            "Upstream bodies that broke off or stalled",
            self.upstream_body_failures.clone(),
        );
        r.register(
            "signature_failures",
            "Narinfos without a valid trusted signature",
            self.signature_failures.clone(),
        );
        r.register(
            "upstream_requests",
            "Requests to upstreams, by answer",
            self.upstream_requests.clone(),
        );
        r.register(
            "upstream_request_seconds",
            "Time to an upstream's answer headers",
            self.upstream_seconds.clone(),
        );
        r.register(
            "site_answers",
            "Requests of other sidecars the site answered, by kind and what it took",
            self.site_answers.clone(),
        );
        r.register(
            "site_upstream_bytes",
            "NAR bytes the site fetched upstream, by the subject whose token fetched them",
            self.site_upstream_bytes.clone(),
        );
        r.register(
            "site_route",
            "Requests to an upstream this machine sent its site first, by outcome",
            self.site_route.clone(),
        );
    }

    /// The series whose labels are known at start-up, at 0.
    fn create_zeroes(&self, upstreams: &[&str]) {
        for kind in [Kind::narinfo, Kind::nar] {
            drop(self.cache_hits.get_or_create(&KindLabel { kind }));
            drop(self.cache_misses.get_or_create(&KindLabel { kind }));
        }
        for upstream in upstreams {
            drop(self.signature_failures.get_or_create(&UpstreamLabel {
                upstream: upstream.to_string(),
            }));
        }
    }

    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RouteStatus { route, status })
            .inc();
    }

    /// The site answered another sidecar's request for `kind` this way.
    pub fn site_answered(&self, kind: Kind, outcome: SiteOutcome) {
        self.site_answers
            .get_or_create(&SiteLabels { kind, outcome })
            .inc();
    }

    /// The site fetched `bytes` of NARs upstream with `subject`'s token.
    pub fn site_fetched(&self, subject: &str, bytes: u64) {
        let subject = {
            let mut known = self.site_subjects.lock().unwrap();
            if known.contains(subject) || known.len() < SITE_SUBJECTS {
                known.insert(subject.to_string());
                subject.to_string()
            } else {
                "other".to_string()
            }
        };
        self.site_upstream_bytes
            .get_or_create(&SubjectLabel { subject })
            .inc_by(bytes);
    }

    /// A request this machine sent its site first: answered there, or passed over.
    pub fn site_routed(&self, upstream: &str, answered: bool) {
        let outcome = if answered { "answered" } else { "passed_over" };
        self.site_route
            .get_or_create(&SiteRouteLabels {
                upstream: upstream.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn cache_hit(&self, kind: Kind) {
        self.cache_hits.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn cache_miss(&self, kind: Kind) {
        self.cache_misses.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn fetched(&self, bytes: u64) {
        self.bytes_fetched.inc_by(bytes);
    }

    /// The counter of bytes sent to clients, for bodies to add to as they go.
    pub fn served(&self) -> Counter {
        self.bytes_served.clone()
    }

    pub fn upstream_body_failed(&self) {
        self.upstream_body_failures.inc();
    }

    pub fn signature_failed(&self, upstream: &str) {
        self.signature_failures
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_string(),
            })
            .inc();
    }

    /// One upstream request; `status` None when no answer came.
    pub fn upstream_answered(
        &self,
        upstream: &str,
        method: &str,
        status: Option<u16>,
        elapsed: Duration,
    ) {
        let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        self.upstream_requests
            .get_or_create(&UpstreamStatus {
                upstream: upstream.to_string(),
                status,
            })
            .inc();
        self.upstream_seconds
            .get_or_create(&UpstreamMethod {
                upstream: upstream.to_string(),
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The exposition text: the counters above, then what `status` says now.
    pub fn render(&self, status: &Status) -> String {
        let mut now = Registry::with_prefix(PREFIX);
        now.register(
            "cache_size_bytes",
            "Bytes of stored cache files",
            ConstGauge::new(status.cache.stored_bytes as i64),
        );
        now.register(
            "cache_no_room",
            "Times the cache had no room (max-cache-size, min-free-space) for a download, served uncached, or an upload",
            ConstCounter::new(status.cache.no_room),
        );
        now.register(
            "cache_evictions",
            "Files evicted to stay within the limits",
            ConstCounter::new(status.cache.evictions),
        );
        now.register(
            "verification_failures",
            "Downloads whose bytes did not match their narinfo",
            ConstCounter::new(status.cache.verification_failures),
        );
        if let Some(push) = &status.push {
            now.register(
                "push_queue_paths",
                "Paths waiting for upload or being uploaded (one per upstream)",
                ConstGauge::new(push.queued as i64),
            );
            now.register(
                "push_uploaded",
                "Paths uploaded since start",
                ConstCounter::new(push.uploaded),
            );
            now.register(
                "push_failures",
                "Failed upload attempts since start (retried or for good)",
                ConstCounter::new(push.failures),
            );
            now.register(
                "push_bytes",
                "Bytes uploaded since start",
                ConstCounter::new(push.bytes),
            );
        }
        let left = Family::<IdentityLabel, Gauge>::default();
        let refreshes = Family::<IdentityLabel, Counter>::default();
        let failures = Family::<IdentityLabel, Counter>::default();
        for (name, health) in &status.identities {
            let label = IdentityLabel {
                identity: name.clone(),
            };
            left.get_or_create(&label)
                .set(health.token_seconds_left.unwrap_or(0) as i64);
            refreshes.get_or_create(&label).inc_by(health.refreshes);
            failures.get_or_create(&label).inc_by(health.failures);
        }
        now.register(
            "token_seconds_left",
            "Lifetime left of the current token",
            left,
        );
        now.register("token_refreshes", "Tokens obtained", refreshes);
        now.register(
            "token_failures",
            "Failed attempts to obtain a token",
            failures,
        );
        let mut out = String::new();
        use prometheus_client::encoding::prometheus_text::encode;
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        let _ = encode(&mut out, &now);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histograms_and_status_render_under_their_names() {
        let m = Metrics::new(&["org"]);
        m.request("narinfo", 200);
        m.request("narinfo", 200);
        m.upstream_answered("org", "GET", Some(200), Duration::from_millis(20));
        m.upstream_answered("org", "PUT", Some(200), Duration::from_secs(30));
        m.served().inc_by(7);
        let mut status = Status::default();
        status.cache.stored_bytes = 42;
        let text = m.render(&status);
        assert!(
            text.contains("nix_sidecar_requests_total{route=\"narinfo\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "nix_sidecar_upstream_request_seconds_bucket{upstream=\"org\",method=\"GET\",le=\"0.025\"} 1"
        ), "{text}");
        assert!(text.contains(
            "nix_sidecar_upstream_request_seconds_count{upstream=\"org\",method=\"GET\"} 1"
        ));
        assert!(text.contains(
            "nix_sidecar_upstream_request_seconds_bucket{upstream=\"org\",method=\"PUT\",le=\"10\"} 0"
        ), "an upload's time is not a pull's latency: {text}");
        assert!(text.contains("nix_sidecar_cache_size_bytes 42"), "{text}");
        assert!(text.contains("nix_sidecar_cache_no_room_total 0"), "{text}");
        assert!(text.contains("nix_sidecar_bytes_served_total 7"));
        assert!(text.contains("nix_sidecar_cache_hits_total{kind=\"nar\"} 0"));
        assert!(text.contains("nix_sidecar_signature_failures_total{upstream=\"org\"} 0"));
    }

    #[test]
    fn site_bytes_per_subject_stop_growing_new_series_past_the_cap() {
        let m = Metrics::new(&[]);
        for i in 0..SITE_SUBJECTS + 5 {
            m.site_fetched(&format!("machine-{i}"), 10);
        }
        m.site_fetched("machine-0", 1);
        let text = m.render(&Status::default());
        let series = text
            .lines()
            .filter(|l| l.starts_with("nix_sidecar_site_upstream_bytes_total{"))
            .count();
        assert_eq!(series, SITE_SUBJECTS + 1, "every known subject and `other`");
        assert!(text.contains("nix_sidecar_site_upstream_bytes_total{subject=\"other\"} 50"));
        assert!(text.contains("nix_sidecar_site_upstream_bytes_total{subject=\"machine-0\"} 11"));
    }
}
