//! Helpers of the property tests that feed arbitrary input to a parser (docs/architecture.md,
//! "Tests: fuzzing the parsers").

use proptest::prelude::*;
use proptest::sample::Index;

/// Cases for such a test: `default` in the test suite; `BRDIVERT_FUZZ_CASES=N` for a long
/// run.
pub fn fuzz_cases(default: u32) -> u32 {
    std::env::var("BRDIVERT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One edit of a text: at a position, replace (0), insert (1) or delete (2) a character.
pub type Edit = (Index, u8, char);

/// Up to `max` edits, with characters that matter to TOML as likely as any other.
pub fn edits(max: usize) -> impl Strategy<Value = Vec<Edit>> {
    let c = prop_oneof![
        proptest::sample::select(vec![
            '"', '\'', '[', ']', '{', '}', '=', ',', '.', '-', '\n', '#', ' ', '0', '9', 'x', ':',
            '/', '\\',
        ]),
        any::<char>(),
    ];
    proptest::collection::vec((any::<Index>(), 0u8..3, c), 0..=max)
}

/// `text` with `edits` applied in order.
pub fn mutate(text: &str, edits: &[Edit]) -> String {
    let mut t: Vec<char> = text.chars().collect();
    for (at, op, c) in edits {
        let i = at.index(t.len() + 1);
        match op {
            0 if i < t.len() => t[i] = *c,
            1 => t.insert(i, *c),
            _ if i < t.len() => {
                t.remove(i);
            }
            _ => {}
        }
    }
    t.into_iter().collect()
}
