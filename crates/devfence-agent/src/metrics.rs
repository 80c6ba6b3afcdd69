//! The agent's metrics in Prometheus (OpenMetrics) text: `devfence_` prefix,
//! units in the names, and label values from small fixed sets (states,
//! kinds, outcomes, gate names, routes, status codes) — never a GUID, BDF or
//! tenant.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Every lifecycle state a device can be in (the ledger's names).
pub const STATES: [&str; 7] = [
    "free",
    "preparing",
    "ready",
    "active",
    "draining",
    "scrubbing",
    "quarantined",
];

/// `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// A lifecycle state.
    pub state: String,
}

/// `kind`, `outcome`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// assign, handover or release.
    pub kind: String,
    /// succeeded, failed or refused.
    pub outcome: String,
}

/// `gate`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabel {
    /// The gate's journal name.
    pub gate: String,
}

/// `route`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's template (`/v1/operations/{id}`), or `other`.
    pub route: String,
    /// The HTTP status code.
    pub status: String,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// Devices of the ledger by lifecycle state (refreshed at each scrape).
    pub devices: Family<StateLabel, Gauge>,
    /// Operations by kind and outcome.
    pub operations: Family<OpLabels, Counter>,
    /// Time from the step before a gate to its verdict, by gate.
    pub gate_seconds: Family<GateLabel, Histogram, fn() -> Histogram>,
    /// Requests by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Connections closed on arrival because the cap was reached.
    pub connections_refused: Counter,
    /// Records in the audit chain (the newest record's sequence number;
    /// pruned records included), read from the ledger at each scrape.
    pub audit_records: Gauge,
    /// Continuous verification's metrics (drift, quarantines, re-verifications).
    pub verify: crate::watch::VerifyMetrics,
    /// Applies (each a sweep) the agent's operations asked of the SM.
    pub sm_sweeps_requested: Counter,
    /// Operations per batch that went to the SM in one apply.
    pub batch_size: Histogram,
    /// The fleet's gauges (issue 13: orphaned and pending memberships, hosts).
    pub fleet: crate::fleet::FleetMetrics,
}

fn gate_histogram() -> Histogram {
    // 1 ms to ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("devfence");
        let devices = Family::<StateLabel, Gauge>::default();
        let operations = Family::<OpLabels, Counter>::default();
        let gate_seconds =
            Family::<GateLabel, Histogram, fn() -> Histogram>::new_with_constructor(gate_histogram);
        let requests = Family::<RequestLabels, Counter>::default();
        let connections_refused = Counter::default();
        let audit_records = Gauge::default();
        let sm_sweeps_requested = Counter::default();
        // 1 to 128 operations.
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register(
            "sm_sweeps_requested",
            "Applies of partition changes (each a sweep) the agent's operations asked of the subnet manager",
            sm_sweeps_requested.clone(),
        );
        registry.register_with_unit(
            "batch_size",
            "IB VF operations per batch that went to the subnet manager in one apply",
            Unit::Other("operations".into()),
            batch_size.clone(),
        );
        registry.register(
            "devices",
            "Devices in the ledger by lifecycle state",
            devices.clone(),
        );
        registry.register(
            "operations",
            "Lifecycle operations started through the agent, by kind and outcome",
            operations.clone(),
        );
        registry.register_with_unit(
            "gate_duration",
            "Time from the step before a gate to its verdict, by gate",
            Unit::Seconds,
            gate_seconds.clone(),
        );
        registry.register(
            "requests",
            "API requests by route and HTTP status",
            requests.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed on arrival: the agent's connection cap was reached",
            connections_refused.clone(),
        );
        registry.register(
            "audit_records",
            "Records appended to the audit chain (the newest record's sequence number)",
            audit_records.clone(),
        );
        let verify = crate::watch::VerifyMetrics::default();
        verify.register(&mut registry);
        let fleet = crate::fleet::FleetMetrics::default();
        fleet.register(&mut registry);
        Metrics {
            fleet,
            verify,
            registry,
            audit_records,
            sm_sweeps_requested,
            batch_size,
            devices,
            operations,
            gate_seconds,
            requests,
            connections_refused,
        }
    }
}

impl Metrics {
    /// Sets the devices gauge from the counts per state (every state present).
    pub fn set_devices(&self, counts: &[(&str, i64)]) {
        for s in STATES {
            let n = counts.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n);
            self.devices
                .get_or_create(&StateLabel {
                    state: s.to_owned(),
                })
                .set(n);
        }
    }

    /// Counts an operation's end.
    pub fn operation(&self, kind: &str, outcome: &str) {
        self.operations
            .get_or_create(&OpLabels {
                kind: kind.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts a request.
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status: status.to_string(),
            })
            .inc();
    }

    /// The text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_units_and_every_state_is_present() {
        let m = Metrics::default();
        m.set_devices(&[("ready", 2)]);
        m.operation("assign", "succeeded");
        m.gate_seconds
            .get_or_create(&GateLabel {
                gate: "gate:driver".into(),
            })
            .observe(0.004);
        m.request("/v1/status", 200);
        m.sm_sweeps_requested.inc_by(1);
        m.batch_size.observe(4.0);
        let t = m.encode();
        assert!(t.contains("devfence_sm_sweeps_requested_total 1"), "{t}");
        assert!(t.contains("devfence_batch_size_operations_count 1"), "{t}");
        assert!(
            t.contains("devfence_batch_size_operations_bucket{le=\"4.0\"} 1"),
            "{t}"
        );
        assert!(t.contains("devfence_devices{state=\"ready\"} 2"), "{t}");
        assert!(t.contains("devfence_devices{state=\"free\"} 0"), "{t}");
        assert!(
            t.contains("devfence_operations_total{kind=\"assign\",outcome=\"succeeded\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("devfence_gate_duration_seconds_count{gate=\"gate:driver\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("devfence_requests_total{route=\"/v1/status\",status=\"200\"} 1"),
            "{t}"
        );
    }
}
