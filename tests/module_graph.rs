//! docs/architecture.md promises a module graph without cycles (`cli` →
//! `run` → the services → `monitor` → ... → `kernel`, `ruleset`, `policy`).
//! This reads `src/` and fails with the cycle, and the files that make each
//! of its edges, when a `crate::` path closes one. Tests and comments do not
//! count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Edges = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src/") {
        let path = entry.expect("reading src/").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module → module it names → files that name it.
fn edges(src: &Path) -> Edges {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut edges = Edges::new();
    for path in files {
        let rel = path.strip_prefix(src).expect("under src/");
        let from = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|c| c.trim_end_matches(".rs").to_string())
            .expect("a file name");
        if from == "lib" || from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("reading a source file");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (_, rest) in line
                .match_indices("crate::")
                .map(|(i, _)| line.split_at(i + 7))
            {
                let to: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !to.is_empty() && to != from {
                    edges
                        .entry(from.clone())
                        .or_default()
                        .entry(to)
                        .or_default()
                        .insert(rel.display().to_string());
                }
            }
        }
    }
    edges
}

/// A cycle through `start`, if there is one (depth-first search).
fn cycle_through(edges: &Edges, start: &str) -> Option<Vec<String>> {
    fn visit(
        edges: &Edges,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in edges.get(at).into_iter().flat_map(|m| m.keys()) {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if visit(edges, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    visit(edges, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn the_module_graph_has_no_cycle() {
    let edges = edges(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        edges.contains_key("cli") && edges.contains_key("monitor"),
        "{edges:?}"
    );
    for module in edges.keys() {
        if let Some(cycle) = cycle_through(&edges, module) {
            let mut why = String::new();
            for (i, from) in cycle.iter().enumerate() {
                let to = &cycle[(i + 1) % cycle.len()];
                why += &format!("\n  {from} -> {to} ({:?})", edges[from][to]);
            }
            panic!("a module cycle: {}{why}", cycle.join(" -> "));
        }
    }
}
