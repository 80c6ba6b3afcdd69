//! The host agent's request parsing on arbitrary bytes: a POST body becomes a
//! lifecycle request or a 400 naming the field; a query string an audit filter,
//! an event stream's `since`, a hook call or an envelope's destination, or a
//! 400; a recover body empty or a 400; a method and path a route or none.
//! Never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(serde_json::Value::Object(body)) = serde_json::from_slice(data)
        && let Err(e) = devfence_agent::api::parse_operation(&body)
    {
        assert_eq!((e.status, e.code), (400, "invalid_input"));
        assert!(e.hint.is_some(), "{e:?}");
    }
    if let Err(e) = devfence_agent::recover::parse_body(data) {
        assert!(e.status == 400 && e.hint.is_some(), "{e:?}");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Err(e) = devfence_agent::api::audit_filter(s) {
            assert_eq!(e.status, 400);
        }
        if let Err(e) = devfence_agent::events::parse_query(s) {
            assert!(e.status == 400 && e.hint.is_some(), "{e:?}");
        }
        if let Err(e) = devfence_agent::hook::parse_query(s) {
            assert!(e.status == 400 && e.hint.is_some(), "{e:?}");
        }
        if let Err(e) = devfence_agent::state::parse_query(s) {
            assert!(e.status == 400 && e.hint.is_some(), "{e:?}");
        }
        let (m, p) = s.split_once(' ').unwrap_or(("GET", s));
        let _ = devfence_agent::api::route_of(m, p);
    }
});
