//! PURE: Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4): a lookup table of
//! a prime size M in which every backend owns about M/N entries (by weight), such that removing
//! one of N backends moves only about 1/N of the table. Every node computes the same table from
//! the same backends, so a flow hashes to the same backend everywhere without shared state.

/// Table sizes offered (primes; the paper recommends M well above 100 x the backend count).
pub const SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];

/// Default table size (about 160 backends at 1% imbalance).
pub const DEFAULT_SIZE: u32 = crate::model::DEFAULT_MAGLEV_SIZE;

/// A backend as Maglev sees it: a stable name (its address and port) and a weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    pub name: &'a [u8],
    pub weight: u32,
    pub id: u32,
}

/// 64-bit FNV-1a with a seed mixed in first: two independent hashes for offset and skip.
fn hash(seed: u64, data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so nearby names spread.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The table: entry i names the backend id owning slot i. `members` sorted or not, the result
/// depends only on the set (members are ordered by name first). Empty when no member has a
/// weight. `size` must be prime.
pub fn table(members: &[Member<'_>], size: u32) -> Vec<u32> {
    let mut members: Vec<&Member<'_>> = members.iter().filter(|m| m.weight > 0).collect();
    if members.is_empty() || size == 0 {
        return Vec::new();
    }
    members.sort_by(|a, b| a.name.cmp(b.name));
    let m = u64::from(size);
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|b| {
            let offset = hash(1, b.name) % m;
            let skip = hash(2, b.name) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut entry: Vec<Option<u32>> = vec![None; size as usize];
    let max_weight = members.iter().map(|b| b.weight).max().unwrap_or(1);
    let mut filled = 0u64;
    // Weighted round: in pass p a backend takes a turn when weight > p (mod max weight), so a
    // backend of weight w takes w turns for every max-weight turns of the heaviest.
    let mut pass = 0u32;
    'outer: loop {
        for (i, b) in members.iter().enumerate() {
            if b.weight <= pass % max_weight {
                continue;
            }
            let (offset, skip) = perms[i];
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if entry[c].is_none() {
                    entry[c] = Some(b.id);
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break 'outer;
            }
        }
        pass += 1;
    }
    entry.into_iter().map(|e| e.unwrap_or(0)).collect()
}

/// Whether `n` is prime (table sizes must be).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= u64::from(n) {
        if u64::from(n) % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 50, i % 50 + 2))
            .collect()
    }

    fn members(names: &[String]) -> Vec<Member<'_>> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Member {
                name: n.as_bytes(),
                weight: 1,
                id: i as u32 + 1,
            })
            .collect()
    }

    #[test]
    fn every_backend_gets_its_share() {
        let names = names(20);
        let t = table(&members(&names), DEFAULT_SIZE);
        assert_eq!(t.len(), DEFAULT_SIZE as usize);
        let mut counts = [0usize; 21];
        for id in &t {
            counts[*id as usize] += 1;
        }
        let (min, max) = (counts[1..].iter().min(), counts[1..].iter().max());
        // M/N = 819.05: Maglev's fill gives every backend floor or ceil of it.
        assert!(*min.unwrap() >= 819 && *max.unwrap() <= 820, "{counts:?}");
    }

    #[test]
    fn removing_one_of_twenty_moves_about_one_twentieth() {
        // Issue #6: the same flow keeps its backend when another backend goes away. Of the
        // table entries (flows) whose backend survives, at least 95% keep it; the removed
        // backend's own 1/20 must move.
        let names = names(20);
        let all = members(&names);
        for size in [4093, DEFAULT_SIZE, 65521] {
            let before = table(&all, size);
            for removed in [1u32, 7, 20] {
                let rest: Vec<Member<'_>> =
                    all.iter().filter(|m| m.id != removed).cloned().collect();
                let after = table(&rest, size);
                let survivors = before.iter().filter(|id| **id != removed).count();
                let kept = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| **b != removed && b == a)
                    .count();
                let kept_share = kept as f64 / survivors as f64;
                assert!(
                    kept_share >= 0.95,
                    "M={size} removed {removed}: {kept_share}"
                );
                let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
                let moved_share = moved as f64 / f64::from(size);
                assert!(moved_share <= 0.05 + 0.03, "M={size}: {moved_share} moved");
                assert!(after.iter().all(|id| *id != removed));
            }
        }
    }

    #[test]
    fn the_table_depends_only_on_the_set() {
        let names = names(10);
        let mut m = members(&names);
        let a = table(&m, 251);
        m.reverse();
        assert_eq!(a, table(&m, 251));
    }

    #[test]
    fn weights_share_the_table() {
        let names = names(2);
        let mut m = members(&names);
        m[0].weight = 3;
        let t = table(&m, 4093);
        let first = t.iter().filter(|id| **id == 1).count() as f64 / 4093.0;
        assert!((first - 0.75).abs() < 0.01, "{first}");
    }

    #[test]
    fn sizes_are_prime() {
        assert!(SIZES.iter().all(|s| is_prime(*s)));
        assert!(!is_prime(16384) && is_prime(DEFAULT_SIZE));
        assert!(table(&[], 251).is_empty());
    }
}
