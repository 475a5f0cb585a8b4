//! `qscore::explain`: the client's `features` list (`parse_features`) and the patch plan its
//! `patch` and `stride` make (`Occlusion::plan`).
//!
//! Input: bytes 0-1 (u16 LE) + 2 = the representation's dim; byte 2 + 1 = `max_features`;
//! bytes 3-4 and 5-6 (u16 LE) = patch and stride (0xFFFF: absent); byte 7 picks the input side
//! (28, 224, or 1 + byte); the rest, lossy UTF-8, is the `features` text.
//!
//! Properties: no panic; a parsed list holds 1 to `max_features` distinct indices below dim, and
//! is exactly the text's items when the text is a plain comma-separated list of them; an
//! accepted plan stays within `max_passes` and `MAX_GRID_CELLS`, `passes()` is what
//! `positions()` yields, every position fits the input, and together they cover every pixel.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qscore::explain::{ExplainLimits, FeatureChoice, MAX_GRID_CELLS, Occlusion, parse_features};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let dim = u16::from_le_bytes([data[0], data[1]]) as usize + 2;
    let max = data[2] as usize + 1;
    let field = |a: u8, b: u8| Some(u16::from_le_bytes([a, b]) as usize).filter(|&v| v != 0xFFFF);
    let (patch, stride) = (field(data[3], data[4]), field(data[5], data[6]));
    let side = match data[7] {
        0 => 28,
        1 => 224,
        b => 1 + b as usize,
    };
    let text = String::from_utf8_lossy(&data[8..]);

    match parse_features(&text, dim, max) {
        Ok(FeatureChoice::List(list)) => {
            assert!(!list.is_empty() && list.len() <= max, "{text:?} -> {list:?}");
            let mut sorted = list.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), list.len(), "duplicates in {list:?}");
            assert!(list.iter().all(|&j| j < dim));
            let items: Vec<usize> = text.split(',').map(|i| i.trim().parse().unwrap()).collect();
            assert_eq!(items, list);
        }
        Ok(_) => assert!(matches!(text.trim(), "discriminative" | "active")),
        Err(e) => assert!(e.to_string().len() < 512, "an error message grows with the input: {e}"),
    }

    let limits = ExplainLimits { max_features: max, max_passes: 4096, ..ExplainLimits::DEFAULT };
    if let Ok(plan) = Occlusion::plan(side, side, patch, stride, &limits) {
        let passes = plan.passes();
        assert!(passes <= limits.max_passes);
        let (rows, cols) = plan.grid();
        assert!(rows * cols <= MAX_GRID_CELLS);
        let mut covered = vec![false; side * side];
        let mut count = 0;
        for (y, x) in plan.positions() {
            count += 1;
            assert!(y + plan.patch <= side && x + plan.patch <= side);
            for yy in y..y + plan.patch {
                covered[yy * side + x..yy * side + x + plan.patch].fill(true);
            }
        }
        assert_eq!(count, passes);
        assert!(covered.iter().all(|&c| c), "a pixel no patch covers: {plan:?}");
        let drops = vec![vec![1.0_f32]; passes];
        let maps = plan.heatmaps(&drops, 1);
        assert!(maps[0].iter().all(|&v| (v - 1.0).abs() < 1e-4), "a constant drop is a constant map");
    }
});
