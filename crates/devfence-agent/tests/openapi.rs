//! The OpenAPI document is generated from the handlers' types
//! (`devfence_agent::openapi`), and the checked-in copy
//! (docs/agent-openapi.json) is exactly what it generates; its routes are
//! exactly the router's; each request body's schema names exactly the fields
//! its parser accepts.
//!
//! `DEVFENCE_REGEN=1 cargo test -p devfence-agent --test openapi` rewrites the
//! copy after a change to a handler's types.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;

use devfence_agent::openapi::{self, OperationRequest, PlanRequest, ROUTE_DOCS};

const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/agent-openapi.json");

#[test]
fn the_checked_in_document_is_the_generated_one() {
    let generated = openapi::document_text();
    if std::env::var_os("DEVFENCE_REGEN").is_some() {
        std::fs::write(CHECKED_IN, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(CHECKED_IN).unwrap();
    assert!(
        on_disk == generated,
        "docs/agent-openapi.json differs from what the handlers' types generate. \
         Hint: DEVFENCE_REGEN=1 cargo test -p devfence-agent --test openapi, then review the diff"
    );
}

#[test]
fn the_document_lists_exactly_the_routes_served() {
    let doc = openapi::document();
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
        "openapi::ROUTE_DOCS and api::ROUTES differ"
    );
    // Every operation documents the typed error for a refused peer, and a
    // POST is the admin's.
    for r in ROUTE_DOCS {
        let op = &doc["paths"][r.path][r.method.to_lowercase()];
        assert!(
            op["responses"]["403"].is_object(),
            "{} {} has no 403",
            r.method,
            r.path
        );
        assert_eq!(
            op["x-devfence-role"] == "act",
            devfence_agent::api::access_of(r.method, r.path) == devfence_agent::auth::Access::Act,
            "{} {}: the document's role is not the one the router asks",
            r.method,
            r.path
        );
    }
}

/// The properties the generated schema of a request body gives.
fn properties(doc: &serde_json::Value, method: &str, path: &str) -> BTreeSet<String> {
    let op = &doc["paths"][path][method];
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    let name = schema["$ref"]
        .as_str()
        .unwrap()
        .trim_start_matches("#/components/schemas/");
    let def = &doc["components"]["schemas"][name];
    assert_eq!(
        def["additionalProperties"], false,
        "{method} {path}: the parser refuses unknown fields, the schema must say so"
    );
    def["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn request_schemas_name_exactly_the_fields_the_parsers_accept() {
    let doc = openapi::document();
    let set = |f: &[&str]| f.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(
        properties(&doc, "post", "/v1/operations"),
        set(OperationRequest::FIELDS)
    );
    assert_eq!(
        properties(&doc, "post", "/v1/plan"),
        set(PlanRequest::FIELDS)
    );
    assert_eq!(
        properties(&doc, "post", "/v1/fleet/revoke"),
        set(devfence_agent::fleet::RevokeBody::FIELDS)
    );
}

#[test]
fn every_schema_reference_resolves() {
    let doc = openapi::document();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r} does not point into the components"));
        assert!(schemas.contains_key(name), "{r} resolves to nothing");
    }
}

fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().unwrap().to_owned());
                } else {
                    collect_refs(x, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
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

mod fed_from_the_spec {
    //! Property tests fed from the document: bodies built from each POST
    //! route's documented properties (and others), values from the
    //! documented enums (and others). The parser and the document agree: what
    //! the parser accepts conforms to the schema, and what does not conform
    //! the parser refuses with a 400 and a hint.

    use devfence_agent::openapi::{self, ROUTE_DOCS};
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    /// Every property name and every enum string value the document gives
    /// request bodies, with the valid device and tenant names the tests use.
    fn vocabulary() -> (Vec<String>, Vec<String>) {
        let doc = openapi::document();
        let mut names = Vec::new();
        let mut words = vec!["0000:5e:10.0".to_owned(), "acme".to_owned()];
        for r in ROUTE_DOCS
            .iter()
            .filter(|r| matches!(r.request, Some(openapi::Request::Json(_))))
        {
            let s = &doc["paths"][r.path][r.method.to_lowercase()]["requestBody"]["content"]["application/json"]
                ["schema"];
            let name = s["$ref"]
                .as_str()
                .unwrap()
                .trim_start_matches("#/components/schemas/");
            walk(
                &doc,
                &doc["components"]["schemas"][name],
                &mut names,
                &mut words,
                0,
            );
        }
        names.sort();
        names.dedup();
        words.sort();
        words.dedup();
        (names, words)
    }

    fn walk(doc: &Value, s: &Value, names: &mut Vec<String>, words: &mut Vec<String>, d: usize) {
        if d > 8 {
            return;
        }
        if let Some(r) = s["$ref"].as_str() {
            let n = r.trim_start_matches("#/components/schemas/");
            walk(doc, &doc["components"]["schemas"][n], names, words, d + 1);
        }
        if let Some(p) = s["properties"].as_object() {
            for (k, v) in p {
                names.push(k.clone());
                walk(doc, v, names, words, d + 1);
            }
        }
        for k in ["anyOf", "oneOf"] {
            for v in s[k].as_array().into_iter().flatten() {
                walk(doc, v, names, words, d + 1);
            }
        }
        for v in s["enum"].as_array().into_iter().flatten() {
            if let Some(w) = v.as_str() {
                words.push(w.to_owned());
            }
        }
        if let Some(w) = s["const"].as_str() {
            words.push(w.to_owned());
        }
    }

    fn value(words: Vec<String>) -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => proptest::sample::select(words).prop_map(Value::String),
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::Bool),
            1 => any::<i64>().prop_map(|n| json!(n)),
            1 => ".{0,12}".prop_map(Value::String),
            1 => Just(json!([])),
            1 => Just(json!({})),
        ]
    }

    fn body() -> impl Strategy<Value = (usize, Map<String, Value>)> {
        let (names, words) = vocabulary();
        let key = prop_oneof![
            4 => proptest::sample::select(names),
            1 => "[a-z]{1,6}",
        ];
        let posts: Vec<usize> = ROUTE_DOCS
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r.request, Some(openapi::Request::Json(_))))
            .map(|(i, _)| i)
            .collect();
        (
            proptest::sample::select(posts),
            proptest::collection::btree_map(key, value(words), 0..5)
                .prop_map(|m| m.into_iter().collect()),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn parsers_and_the_document_agree((route, b) in body()) {
            static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
            let doc = DOC.get_or_init(openapi::document);
            let r = &ROUTE_DOCS[route];
            let schema = doc["paths"][r.path]["post"]["requestBody"]["content"]["application/json"]["schema"].clone();
            let conforms = openapi::validate(doc, &schema, &Value::Object(b.clone()));
            match devfence_agent::api::parse_body(r.path, &b) {
                Ok(()) => prop_assert!(conforms.is_ok(), "{} accepted {b:?}, off the document: {conforms:?}", r.path),
                Err(e) => {
                    prop_assert_eq!(e.status, 400, "{:?}", e);
                    prop_assert!(e.hint.is_some(), "{:?}", e);
                }
            }
            if conforms.is_err() {
                prop_assert!(devfence_agent::api::parse_body(r.path, &b).is_err(), "{} accepted {b:?}, which the document refuses", r.path);
            }
        }
    }
}
