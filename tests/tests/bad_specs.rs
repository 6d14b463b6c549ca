//! The corpus of bad specs in `tests/bad_specs`: each `NAME.toml` must be refused by
//! `Spec::parse`, and every line of `NAME.expected` must appear in the error text, so that a
//! user who gets the spec wrong is told which field and what would be allowed. The examples
//! shipped in `examples/` must all parse.

use std::fs;
use std::path::{Path, PathBuf};

use backfill_common::spec::Spec;

/// The corpus must not shrink silently.
const MIN_CASES: usize = 30;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every file in `dir` whose name ends with `.toml`, sorted by name.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// One problem with one case, reported together with all the others.
struct Failure {
    case: String,
    problem: String,
}

/// Checks one `.toml` against its `.expected`; returns the problems found.
fn check_case(toml_path: &Path) -> Vec<Failure> {
    let case = file_name(toml_path);
    let fail = |problem: String| Failure {
        case: case.clone(),
        problem,
    };
    let expected_path = toml_path.with_extension("expected");
    let expected = match fs::read_to_string(&expected_path) {
        Ok(text) => text,
        Err(e) => {
            return vec![fail(format!(
                "no readable {} next to it: {e}",
                file_name(&expected_path)
            ))];
        }
    };
    let expected: Vec<&str> = expected
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.trim().is_empty())
        .collect();
    if expected.is_empty() {
        return vec![fail(format!(
            "{} has no expected lines",
            file_name(&expected_path)
        ))];
    }
    let text = match fs::read_to_string(toml_path) {
        Ok(text) => text,
        Err(e) => return vec![fail(format!("cannot read it: {e}"))],
    };
    let message = match Spec::parse(&text) {
        Ok(spec) => {
            return vec![fail(format!(
                "the spec was accepted but must be refused (parsed as spec `{}`)",
                spec.name
            ))];
        }
        Err(e) => e.to_string(),
    };
    expected
        .iter()
        .filter(|line| !message.contains(*line))
        .map(|line| {
            fail(format!(
                "expected the error to contain:\n    {line}\n  actual error:\n{}",
                indent(&message)
            ))
        })
        .collect()
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("    {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_bad_spec_is_refused_with_a_helpful_message() {
    let dir = manifest_dir().join("bad_specs");
    let cases = toml_files(&dir);
    assert!(
        cases.len() >= MIN_CASES,
        "{} holds {} cases; expected at least {MIN_CASES}",
        dir.display(),
        cases.len()
    );

    let failures: Vec<Failure> = cases.iter().flat_map(|path| check_case(path)).collect();
    if !failures.is_empty() {
        let report = failures
            .iter()
            .map(|f| format!("- {}: {}", f.case, f.problem))
            .collect::<Vec<_>>()
            .join("\n");
        let mut failing: Vec<&str> = failures.iter().map(|f| f.case.as_str()).collect();
        failing.dedup();
        panic!(
            "{} problem(s) in {} of {} bad spec case(s) in {}:\n{report}",
            failures.len(),
            failing.len(),
            cases.len(),
            dir.display()
        );
    }
}

#[test]
fn every_expected_file_has_its_spec() {
    let dir = manifest_dir().join("bad_specs");
    let mut orphans: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "expected"))
        .filter(|path| !path.with_extension("toml").is_file())
        .map(|path| file_name(&path))
        .collect();
    orphans.sort();
    assert!(
        orphans.is_empty(),
        "these .expected files in {} have no matching .toml: {}",
        dir.display(),
        orphans.join(", ")
    );
}

#[test]
fn every_example_parses() {
    let dir = manifest_dir()
        .parent()
        .expect("the tests crate lives inside the workspace")
        .join("examples");
    let examples = toml_files(&dir);
    assert!(
        !examples.is_empty(),
        "no example specs found in {}",
        dir.display()
    );
    let failures: Vec<String> = examples
        .iter()
        .filter_map(|path| {
            let text = fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            Spec::parse(&text)
                .err()
                .map(|e| format!("- {}:\n{}", file_name(path), indent(&e.to_string())))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} example spec(s) in {} do not parse:\n{}",
        failures.len(),
        dir.display(),
        failures.join("\n")
    );
}
