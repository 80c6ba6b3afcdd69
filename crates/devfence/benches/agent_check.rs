//! Benchmark (issue 12 item 4): `GET /v1/check` through the host agent on the
//! `scale` profile (4096 VFs, 1024 mdevs, 65,536 AP queues), answered from the
//! live inventory vs from a full walk of the tree per request. Run with
//! `cargo bench -p devfence --bench agent_check`.
//!
//! Both modes go through the agent's own request handler (`api::handle`: the
//! route, the use case on a blocking thread, the JSON answer), in process,
//! without the socket: the socket's cost is the same for both and small
//! beside either. The live mode is what the agent serves on the real host,
//! where kernel uevents keep the inventory current; on a simulated root it
//! walks per request, so the bench switches the live inventory on by hand.
//! Figures go to docs/benchmarks.md.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devfence_agent::api::{State, handle};
use devfence_agent::auth::Policy;
use devfence_agent::{Limits, Options};
use devfence_host::{HostRoot, sim};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

const ITERATIONS: usize = 15;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fail(what: &str) -> ! {
    eprintln!("{what}");
    std::process::exit(2);
}

async fn check(state: &Arc<State>) -> serde_json::Value {
    let req = hyper::Request::builder()
        .method("GET")
        .uri("/v1/check")
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|e| fail(&format!("request: {e}")));
    let resp = handle(Arc::clone(state), None, req).await;
    if resp.status() != 200 {
        fail(&format!("GET /v1/check answered {}", resp.status()));
    }
    let b = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => fail(&format!("body: {e}")),
    };
    serde_json::from_slice(&b).unwrap_or_else(|e| fail(&format!("JSON: {e}")))
}

fn walks(state: &State) -> u64 {
    state
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("devfence_inventory_walks_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn rounds(state: &Arc<State>, want: &str) -> Vec<Duration> {
    let mut times = Vec::new();
    // One warm-up round: the page cache, and for the live mode the first walk.
    for i in 0..=ITERATIONS {
        let t0 = Instant::now();
        let v = check(state).await;
        let t = t0.elapsed();
        if i > 0 {
            if v["inventory"]["source"] != want {
                fail(&format!(
                    "round {i}: inventory {} not {want}",
                    v["inventory"]
                ));
            }
            times.push(t);
        }
    }
    times
}

fn main() {
    let base = match std::env::var_os("TMPDIR") {
        Some(t) => std::path::PathBuf::from(t),
        None if Path::new("/dev/shm").is_dir() => std::path::PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    let tmp = tempfile::Builder::new()
        .prefix("devfence-bench-")
        .tempdir_in(&base)
        .unwrap_or_else(|e| fail(&format!("temporary directory: {e}")));
    let host = tmp.path().join("scale");
    let t = Instant::now();
    let summary = sim::generate(&sim::GenerateOptions {
        profile: sim::Profile::Scale,
        out: host.clone(),
        vfs: None,
        host_id: 0,
    })
    .unwrap_or_else(|e| fail(&format!("generate: {e}")));
    println!("generated scale profile in {:.2?}: {summary}", t.elapsed());
    let state = Arc::new(State::new(
        Options {
            root: HostRoot::new(&host),
            ledger: None,
            config: None,
            socket: None,
            limits: Limits::default(),
            log_level: None,
        },
        Policy {
            admin_gid: None,
            reader_gid: None,
        },
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    rt.block_on(async {
        let w0 = walks(&state);
        let mut walk = rounds(&state, "walk").await;
        let w1 = walks(&state);
        state.watch.inventory.set_live(true);
        let mut live = rounds(&state, "live").await;
        let w2 = walks(&state);
        let v = check(&state).await;
        let min = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
        println!(
            "GET /v1/check, {} findings: full walk per request: median {:.1?} (min {:.1?}), {} walks; live inventory: median {:.1?} (min {:.1?}), {} walk; over {ITERATIONS} rounds each",
            v["findings"].as_array().map_or(0, Vec::len),
            median(&mut walk),
            min(&walk),
            w1 - w0,
            median(&mut live),
            min(&live),
            w2 - w1,
        );
        println!(
            "ratio walk / live = {:.1} (medians)",
            median(&mut walk).as_secs_f64() / median(&mut live).as_secs_f64().max(1e-9)
        );
    });
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at the end: {}", l.trim());
    }
}
