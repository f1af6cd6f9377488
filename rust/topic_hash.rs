//! Which worker owns a topic.
//!
//! `topic_hash` is SipHash-1-3 of the topic's UTF-8 bytes under a fixed key,
//! so every process, every run and every machine computes the same value
//! (Python's `hash()` is randomized per process and cannot be used).
//! `owner` maps the hash onto `workers` slots with jump consistent hashing
//! (Lamping and Veach, 2014): uniform, and when the worker count grows from
//! n to n+1 only 1/(n+1) of the topics move.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// The fixed SipHash key. Changing it moves every topic to another worker.
const KEY: (u64, u64) = (0x7369_676e_616c_696e, 0x672d_7368_6172_6465);

pub fn topic_hash(topic: &str) -> u64 {
    let mut hasher = SipHasher13::new_with_keys(KEY.0, KEY.1);
    hasher.write(topic.as_bytes());
    hasher.finish()
}

/// Jump consistent hash of `hash` onto `0..buckets` (`buckets` >= 1).
pub fn jump(mut hash: u64, buckets: u32) -> u32 {
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < i64::from(buckets) {
        bucket = next;
        hash = hash.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((hash >> 33) + 1) as f64)) as i64;
    }
    bucket as u32
}

/// The index of the worker that owns `topic` among `workers` workers.
pub fn owner(topic: &str, workers: u32) -> u32 {
    jump(topic_hash(topic), workers.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_and_owners_are_pinned() {
        // A change here moves every topic of every deployment to another
        // worker: these values are part of the contract between processes.
        assert_eq!(topic_hash("room-1"), 2_776_632_716_497_522_223);
        assert_eq!(topic_hash("é"), 827_585_618_293_137_934);
        let owners: Vec<u32> = (0..8).map(|i| owner(&format!("room-{i}"), 4)).collect();
        assert_eq!(owners, [2, 3, 3, 0, 2, 1, 1, 3]);
    }

    #[test]
    fn owners_are_balanced() {
        let mut counts = [0u32; 4];
        for i in 0..40_000 {
            counts[owner(&format!("topic-{i}"), 4) as usize] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
    }

    proptest! {
        #[test]
        fn owner_in_range_and_moves_minimally(topic in ".{0,40}", n in 1u32..64) {
            let before = owner(&topic, n);
            prop_assert!(before < n);
            let after = owner(&topic, n + 1);
            prop_assert!(after == before || after == n);
        }
    }
}
