/// Sorts inclusive ranges and merges the ones that overlap or touch: the kernel
/// rejects overlapping interval elements, and fewer elements load faster.
pub fn merge_ranges(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn merges_overlapping_and_adjacent() {
        assert_eq!(
            merge_ranges(vec![(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]),
            vec![(1, 9), (20, 30)]
        );
        assert_eq!(
            merge_ranges(vec![(0, u128::MAX), (3, 4)]),
            vec![(0, u128::MAX)]
        );
    }

    proptest! {
        #[test]
        fn merged_ranges_cover_exactly_the_same_points(ranges in prop::collection::vec((0u128..200, 0u128..20), 0..30), probe in 0u128..230) {
            let ranges: Vec<(u128, u128)> = ranges.into_iter().map(|(s, l)| (s, s + l)).collect();
            let merged = merge_ranges(ranges.clone());
            let before = ranges.iter().any(|&(s, e)| s <= probe && probe <= e);
            let after = merged.iter().any(|&(s, e)| s <= probe && probe <= e);
            prop_assert_eq!(before, after);
            for w in merged.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0, "merged ranges must be disjoint and not touching");
            }
        }
    }
}
