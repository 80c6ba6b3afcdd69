//! The checked-in OpenAPI document (docs/agent-openapi.json, written by hand)
//! and the router agree: every route the agent serves is in it with its
//! method, and it names no route the agent does not serve.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;

#[test]
fn the_openapi_document_lists_exactly_the_routes_served() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/agent-openapi.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (p, item) in doc["paths"].as_object().unwrap() {
        for m in item.as_object().unwrap().keys() {
            documented.insert((m.to_uppercase(), p.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = devfence_agent::api::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        documented, served,
        "docs/agent-openapi.json and api::ROUTES differ"
    );
    // Every operation documents the typed error for a refused peer.
    for (m, p) in &served {
        let op = &doc["paths"][p][m.to_lowercase()];
        assert!(op["responses"]["403"].is_object(), "{m} {p} has no 403");
    }
}

#[test]
fn templates_match_concrete_paths_only() {
    use devfence_agent::api::route_of;
    assert_eq!(
        route_of("GET", "/v1/operations/op-7"),
        Some("/v1/operations/{id}")
    );
    assert_eq!(route_of("GET", "/v1/operations/"), None);
    assert_eq!(route_of("GET", "/v1/operations/op-7/x"), None);
    assert_eq!(route_of("POST", "/v1/operations"), Some("/v1/operations"));
    assert_eq!(route_of("DELETE", "/v1/operations"), None);
    assert_eq!(route_of("GET", "/metrics"), Some("/metrics"));
}
