//! Every `--json` document: one shape rule, one schema version (issue 15 item
//! 6; docs/json.md lists each command's document).
//!
//! An object gains `"schema": 1`; a list becomes `{"schema": 1, "items": [...]}`
//! and any other value `{"schema": 1, "value": ...}`, so a script can always
//! read `.schema` first and the document grows fields without breaking it.

use std::io::Write;

use anyhow::Result;

/// The version of every JSON document devfence prints.
pub const SCHEMA: u64 = 1;

/// `value` as the document described in the module docs.
pub fn document(value: &impl serde::Serialize) -> Result<serde_json::Value> {
    Ok(match serde_json::to_value(value)? {
        serde_json::Value::Object(mut m) => {
            // A document with a schema of its own (the inventory's) keeps it.
            m.entry("schema").or_insert(SCHEMA.into());
            serde_json::Value::Object(m)
        }
        v @ serde_json::Value::Array(_) => serde_json::json!({ "schema": SCHEMA, "items": v }),
        v => serde_json::json!({ "schema": SCHEMA, "value": v }),
    })
}

/// Writes `value` as a JSON document (pretty, one trailing newline).
pub fn emit(out: &mut dyn Write, value: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, &document(value)?)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_document_carries_the_schema() {
        let o = document(&serde_json::json!({"a": 1})).unwrap_or_default();
        assert_eq!(o["schema"], 1);
        assert_eq!(o["a"], 1);
        let l = document(&vec![1, 2]).unwrap_or_default();
        assert_eq!(l["schema"], 1);
        assert_eq!(l["items"][1], 2);
        let n = document(&Option::<u8>::None).unwrap_or_default();
        assert_eq!(n["schema"], 1);
        assert!(n["value"].is_null());
    }
}
