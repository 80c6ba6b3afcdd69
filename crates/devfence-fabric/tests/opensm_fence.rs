//! The fabric controller's fencing token in the OpenSM backend, against a real
//! OpenSM on ibsim: the token is written into devfence's block, an apply over a
//! higher token is refused (checked on the file re-read just before it is
//! replaced), and so is an apply without a token over a fenced file.

use std::time::{Duration, Instant};

use devfence_fabric::opensm::OpenSmSm;
use devfence_fabric::opensm::fence::{FENCE_MARK, token_in};
use devfence_fabric::{Expectation, FabricError, PartitionKey, SubnetManager, wait_verified};
use devfence_fabric_harness::{FabricSpec, in_fabric};
use devfence_model::{Guid, Membership};

const BASE: Guid = Guid(0x0002_c903_00e0_0001);

fn vf(i: u64) -> Guid {
    Guid(BASE.0 + 2 * i)
}
fn key(p: u16) -> PartitionKey {
    PartitionKey::new(p).expect("valid")
}

#[test]
fn a_newer_token_in_the_file_refuses_an_older_leaders_apply() {
    in_fabric(
        "a_newer_token_in_the_file_refuses_an_older_leaders_apply",
        &FabricSpec::vfs(2, BASE),
        |f| {
            let path = f.dir().join("partitions.conf");
            let read = || std::fs::read_to_string(&path).expect("read");
            let old = OpenSmSm::new(f.opensm_config());
            let new = OpenSmSm::new(f.opensm_config());
            assert!(old.set_fence_token(5).expect("a token"));
            assert!(new.set_fence_token(7).expect("a token"));
            assert!(new.set_fence_token(0).is_err(), "0 is no token");

            // The older leader applies first: its token is in the block, and
            // the change is verified at the SA.
            old.stage_add(vf(0), key(0x8001), Membership::Full)
                .expect("stage");
            let t = old.apply().expect("apply");
            let exp = Expectation::after(t).grant(vf(0), [(key(0x8001), Membership::Full)]);
            wait_verified(&old, &exp, Instant::now() + Duration::from_secs(10)).expect("verified");
            assert_eq!(old.fence_token().expect("reads"), Some(5));
            assert!(read().contains(&format!("{FENCE_MARK} 5\n")), "{}", read());

            // A newer leader applies over it.
            new.stage_add(vf(1), key(0x8002), Membership::Full)
                .expect("stage");
            new.apply().expect("a newer token applies");
            assert_eq!(new.fence_token().expect("reads"), Some(7));

            // The older one can no longer apply: refused, nothing written,
            // its change still staged.
            let before = read();
            old.stage_remove_all(vf(1)).expect("stage");
            let e = old.apply().expect_err("stale");
            assert!(
                matches!(&e, FabricError::Refused { detail, .. } if detail.contains("fencing token 7")),
                "{e}"
            );
            assert_eq!(read(), before, "a refused apply wrote");
            assert_eq!(old.discard_staged(), 1);

            // Nor can a writer without a token.
            let plain = OpenSmSm::new(f.opensm_config());
            plain
                .stage_add(vf(0), key(0x8003), Membership::Full)
                .expect("stage");
            let e = plain.apply().expect_err("unfenced over a fenced file");
            assert!(
                e.to_string().contains("managed by a fabric controller"),
                "{e}"
            );
            assert_eq!(read(), before);

            // The check is on the file re-read just before the replace: a
            // newer leader's write landing while the older one prepares its
            // apply refuses it too.
            let mid = OpenSmSm::new(f.opensm_config());
            assert!(mid.set_fence_token(7).expect("a token"));
            let p2 = path.clone();
            let mut once = true;
            mid.set_before_replace(move |_| {
                if once {
                    once = false;
                    let text = std::fs::read_to_string(&p2).expect("read");
                    let bumped =
                        text.replace(&format!("{FENCE_MARK} 7"), &format!("{FENCE_MARK} 9"));
                    std::fs::write(&p2, bumped).expect("write");
                }
            });
            mid.stage_add(vf(0), key(0x8001), Membership::Limited)
                .expect("stage");
            let e = mid.apply().expect_err("a newer token appeared");
            assert!(e.to_string().contains("fencing token 9"), "{e}");
            assert_eq!(token_in(&read()).expect("reads"), Some(9));
        },
    );
}
