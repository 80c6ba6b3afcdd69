//! The fencing token in devfence's block of the partitions file (issue 13,
//! the fabric controller).
//!
//! A fabric controller is elected through an etcd lease; the create revision
//! of its leader key is its **fencing token**, which grows with every new
//! leader. The controller hands it to the backend
//! ([`SubnetManager::set_fence_token`](crate::SubnetManager::set_fence_token));
//! every apply then writes it as a comment line in devfence's block:
//!
//! ```text
//! # devfence: begin managed partitions (written by devfence: edits inside are overwritten)
//! # devfence-fence 1234
//! Default=0x7fff, ipoib : …
//! ```
//!
//! and **refuses** (`Refused`) when the file it re-reads just before replacing
//! it (under the apply lock every devfence on the SM host takes) already holds
//! a higher token: a controller that lost its leadership — paused, partitioned,
//! slow — can never overwrite what a newer leader applied. An apply without a
//! token on a file that holds one is refused too: such a file belongs to a
//! fabric controller. OpenSM ignores the comment.
//!
//! The controller also reads the token back ([`token_in`]) before it publishes
//! what it applied: the file's token must equal its own.

use crate::FabricError;

/// How the token's comment line begins.
pub const FENCE_MARK: &str = "# devfence-fence";

/// The fencing token the file holds (the highest, should there be several
/// lines), or `None`.
///
/// # Errors
/// A fence line whose token is not a decimal number ([`FabricError::Malformed`]):
/// the file's fence cannot be trusted, so nothing may be applied over it.
pub fn token_in(text: &str) -> Result<Option<u64>, FabricError> {
    let mut best: Option<u64> = None;
    for (i, line) in text.split('\n').enumerate() {
        let t = line.trim();
        let Some(rest) = t.strip_prefix(FENCE_MARK) else {
            continue;
        };
        let v: u64 = rest.trim().parse().map_err(|_| FabricError::Malformed {
            backend: "opensm".into(),
            detail: format!(
                "line {}: the fence line does not hold a token (a decimal number)",
                i + 1
            ),
            hint: format!(
                "the line `{FENCE_MARK} N` belongs to the fabric controller; remove the damaged line and let the leading controller apply again"
            ),
        })?;
        best = Some(best.map_or(v, |b| b.max(v)));
    }
    Ok(best)
}

/// `text` (a file devfence just rendered) with its fence line set to `token`:
/// any fence line removed, and one written right after the block's first line.
#[must_use]
pub fn with_token(text: &str, token: u64) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    let mut placed = false;
    for line in text.split_inclusive('\n') {
        if line.trim().starts_with(FENCE_MARK) {
            continue;
        }
        out.push_str(line);
        if !placed && line.trim().starts_with(super::partitions::BEGIN_MARK) {
            if !line.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("{FENCE_MARK} {token}\n"));
            placed = true;
        }
    }
    out
}

/// Whether an apply holding `ours` may replace a file holding `theirs`.
///
/// # Errors
/// [`FabricError::Refused`] when the file holds a higher token than ours, or a
/// token while we hold none.
pub fn check(theirs: Option<u64>, ours: Option<u64>) -> Result<(), FabricError> {
    match (theirs, ours) {
        (None, _) => Ok(()),
        (Some(t), Some(o)) if t <= o => Ok(()),
        (Some(t), Some(o)) => Err(FabricError::Refused {
            backend: "opensm".into(),
            detail: format!(
                "the partitions file carries fencing token {t}, newer than this controller's {o}: another controller leads the fabric now"
            ),
            hint: "this controller lost its leadership; nothing was written. It stops applying and campaigns again (see `devfence fleet status`)".into(),
        }),
        (Some(t), None) => Err(FabricError::Refused {
            backend: "opensm".into(),
            detail: format!(
                "the partitions file carries fencing token {t}: it is managed by a fabric controller"
            ),
            hint: "on a fleet, memberships reach the SM through the fabric controller (`devfence serve --role fabric-controller`); nothing was written".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MembershipMap;
    use crate::opensm::partitions;

    #[test]
    fn the_token_is_written_in_the_block_and_read_back() {
        let block = partitions::render_block(&MembershipMap::new());
        let text = format!("Op=0x0010 : ALL=full ;\n{block}");
        assert_eq!(token_in(&text).expect("reads"), None);
        let fenced = with_token(&text, 42);
        assert_eq!(token_in(&fenced).expect("reads"), Some(42));
        let again = with_token(&fenced, 43);
        assert_eq!(token_in(&again).expect("reads"), Some(43));
        assert_eq!(again.matches(FENCE_MARK).count(), 1, "{again}");
        // OpenSM's grammar (devfence's parser of it) ignores the line, and the
        // operator's part is kept.
        let p = partitions::parse(&again).expect("parses");
        assert_eq!(p.managed().expect("managed"), MembershipMap::new());
        assert!(again.starts_with("Op=0x0010 : ALL=full ;\n"));
        let bad = again.replace("43", "x43");
        assert!(token_in(&bad).is_err());
    }

    #[test]
    fn a_higher_token_or_none_refuses() {
        check(None, None).expect("no fence");
        check(None, Some(5)).expect("first fence");
        check(Some(5), Some(5)).expect("own");
        check(Some(4), Some(5)).expect("newer leader");
        let e = check(Some(6), Some(5)).expect_err("stale");
        assert!(e.to_string().contains("fencing token 6"), "{e}");
        assert!(!e.is_retryable());
        check(Some(6), None).expect_err("unfenced writer");
    }
}
