//! Property tests (issue 17) of the manifest loader: random mutations of the repository's
//! `examples/` files (lines dropped, duplicated or swapped, scalars replaced, bytes inserted,
//! the text cut short). Invariants: no panic; every document is loaded, skipped with a
//! note, or invalid with an error that names the file, the object (or `document N`), the
//! field (or `-`) and a reason. `FUZZ_CASES` sets the number of cases (default 256); shrunk
//! failures are kept in `proptest-regressions/`.

use std::path::Path;

use proptest::prelude::*;
use trellis_control_plane::config::load::{Document, parse_file};

const EXAMPLES: &[(&str, &str)] = &[
    (
        "examples/seed-policies.yaml",
        include_str!("../../examples/seed-policies.yaml"),
    ),
    (
        "examples/local-traffic-policy.yaml",
        include_str!("../../examples/local-traffic-policy.yaml"),
    ),
];

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

#[derive(Debug, Clone)]
enum Edit {
    Drop(prop::sample::Index),
    Duplicate(prop::sample::Index),
    Swap(prop::sample::Index, prop::sample::Index),
    /// Replace the value after the first `:` of a line.
    Value(prop::sample::Index, String),
    Insert(prop::sample::Index, String),
    Truncate(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let value = prop_oneof![
        Just("".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("null".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("\"*\"".to_string()),
        Just("[a, {b: c}]".to_string()),
        ".{0,16}",
    ];
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Edit::Drop),
        any::<prop::sample::Index>().prop_map(Edit::Duplicate),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Edit::Swap(a, b)),
        (any::<prop::sample::Index>(), value).prop_map(|(i, v)| Edit::Value(i, v)),
        (any::<prop::sample::Index>(), ".{0,24}").prop_map(|(i, s)| Edit::Insert(i, s)),
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
    ]
}

fn mutate(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for e in edits {
        if lines.is_empty() {
            break;
        }
        match e {
            Edit::Drop(i) => {
                lines.remove(i.index(lines.len()));
            }
            Edit::Duplicate(i) => {
                let at = i.index(lines.len());
                let l = lines[at].clone();
                lines.insert(at, l);
            }
            Edit::Swap(a, b) => {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
            }
            Edit::Value(i, v) => {
                let at = i.index(lines.len());
                if let Some((k, _)) = lines[at].split_once(':') {
                    lines[at] = format!("{k}: {v}");
                }
            }
            Edit::Insert(i, s) => {
                let at = i.index(lines.len() + 1);
                lines.insert(at, s.clone());
            }
            Edit::Truncate(i) => {
                let at = i.index(lines.len() + 1);
                lines.truncate(at);
            }
        }
    }
    lines.join("\n")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn a_mutated_example_loads_or_names_what_is_wrong(
        which in 0..EXAMPLES.len(),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let (file, text) = EXAMPLES[which];
        let mutated = mutate(text, &edits);
        for d in parse_file(Path::new(file), &mutated) {
            match d {
                Document::Loaded(l) => {
                    for w in &l.warnings {
                        prop_assert!(w.starts_with(file), "a warning without the file: {w}");
                    }
                }
                Document::Skipped(note) => prop_assert!(note.starts_with(file), "{note}"),
                Document::Invalid(e) => {
                    prop_assert_eq!(&e.file, file);
                    prop_assert!(!e.object.is_empty() && !e.field.is_empty() && !e.reason.is_empty(), "{e:?}");
                }
            }
        }
    }
}
