//! The BPF crate's layers (run by the unit tests of `cargo xtask test`): each module folder of
//! `proxy-ebpf/src` is a layer, and a file may use only the layers below its own and files of
//! its own layer that do not use it back, directly or through others (no cycles).
//!
//! The rule is checked on the source text: every `crate::` and `super::` path, in `use`
//! declarations (trees expanded) and in expressions.

#![cfg(test)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// The layers, lowest first. `main.rs` (the programs) sits above all of them.
const LAYERS: [&str; 5] = ["access", "headers", "flow", "services", "hooks"];

/// A module: its layer's index (`LAYERS.len()` for `main.rs`) and its file's stem within the
/// layer (`mod` for the folder's `mod.rs`).
type Module = (usize, String);

/// What the files of the crate (paths relative to `src/`, with their text) break of the rule.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let mut known: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let mut modules = Vec::new();
    let mut problems = Vec::new();
    for (path, text) in files {
        match module_of(path) {
            Some(m) => {
                known.entry(m.0).or_default().insert(m.1.clone());
                modules.push((m, path, text));
            }
            None if path == "lib.rs" => {}
            None => problems.push(format!(
                "{path}: not in a layer folder ({})",
                LAYERS.join(", ")
            )),
        }
    }
    // Edges within a layer, for the cycle check.
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, path, text) in &modules {
        for reference in references(text) {
            let target = match reference.first().map(String::as_str) {
                Some("crate") => {
                    let Some(layer) = reference.get(1) else {
                        continue;
                    };
                    let Some(rank) = LAYERS.iter().position(|l| l == layer) else {
                        problems.push(format!("{path}: uses crate::{layer}, which is not a layer"));
                        continue;
                    };
                    (rank, reference.get(2).cloned())
                }
                // In a folder's mod.rs, `super` is the crate root.
                Some("super") if from.1 == "mod" => (LAYERS.len(), None),
                Some("super") if from.0 < LAYERS.len() => (from.0, reference.get(1).cloned()),
                _ => continue,
            };
            let (rank, item) = target;
            let stem = match item {
                Some(s) if known.get(&rank).is_some_and(|k| k.contains(&s)) => s,
                _ => "mod".to_string(),
            };
            if rank > from.0 {
                problems.push(format!(
                    "{path}: uses {}, a layer above its own ({})",
                    reference.join("::"),
                    layer_name(from.0)
                ));
            } else if rank == from.0 && stem != from.1 {
                edges.entry(from.clone()).or_default().insert((rank, stem));
            }
        }
    }
    problems.extend(cycles(&edges));
    problems
}

fn layer_name(rank: usize) -> &'static str {
    LAYERS.get(rank).copied().unwrap_or("main.rs")
}

fn module_of(path: &str) -> Option<Module> {
    if path == "main.rs" {
        return Some((LAYERS.len(), "main".into()));
    }
    let (layer, rest) = path.split_once('/')?;
    let rank = LAYERS.iter().position(|l| *l == layer)?;
    let stem = rest.split('/').next()?.trim_end_matches(".rs");
    Some((rank, stem.to_string()))
}

/// Cycles among the edges, one message each (found by depth-first search).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<String> {
    fn visit(
        m: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        stack: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
        out: &mut Vec<String>,
    ) {
        if let Some(at) = stack.iter().position(|s| s == m) {
            let names: Vec<String> = stack[at..]
                .iter()
                .chain(std::iter::once(m))
                .map(|(r, s)| format!("{}/{s}", layer_name(*r)))
                .collect();
            out.push(format!("import cycle: {}", names.join(" -> ")));
            return;
        }
        if !done.insert(m.clone()) {
            return;
        }
        stack.push(m.clone());
        for next in edges.get(m).into_iter().flatten() {
            visit(next, edges, stack, done, out);
        }
        stack.pop();
    }
    let mut out = Vec::new();
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        visit(m, edges, &mut Vec::new(), &mut done, &mut out);
    }
    out
}

/// Every path starting with `crate` or `super` in `text` (comments removed), as segments;
/// `use` trees are expanded into one path per leaf.
fn references(text: &str) -> Vec<Vec<String>> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let tokens = tokenize(&code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == "use" {
            let end = tokens[i..]
                .iter()
                .position(|t| t == ";")
                .map_or(tokens.len(), |p| i + p);
            let mut at = i + 1;
            expand(&tokens[..end], &mut at, &[], &mut out);
            i = end;
        } else if tokens[i] == "crate" || tokens[i] == "super" {
            let mut path = vec![tokens[i].clone()];
            let mut j = i + 1;
            while j + 1 < tokens.len() && tokens[j] == "::" && is_ident(&tokens[j + 1]) {
                path.push(tokens[j + 1].clone());
                j += 2;
            }
            out.push(path);
            i = j;
        } else {
            i += 1;
        }
    }
    out.retain(|p| p.first().is_some_and(|s| s == "crate" || s == "super"));
    out
}

fn is_ident(t: &str) -> bool {
    t.chars().all(|c| c.is_alphanumeric() || c == '_')
}

fn tokenize(code: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push("::".into());
            i += 2;
        } else if c.is_whitespace() {
            i += 1;
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }
    tokens
}

/// Expands the use tree starting at `tokens[*at]` under `prefix`.
fn expand(tokens: &[String], at: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    while *at < tokens.len() {
        let t = &tokens[*at];
        if t == "{" {
            *at += 1;
            while *at < tokens.len() && tokens[*at] != "}" {
                expand(tokens, at, &path, out);
                if *at < tokens.len() && tokens[*at] == "," {
                    *at += 1;
                }
            }
            *at += 1;
            return;
        } else if t == "::" {
            *at += 1;
        } else if t == "as" {
            *at += 2;
        } else if t == "," || t == "}" {
            break;
        } else {
            if t != "self" {
                path.push(t.clone());
            }
            *at += 1;
        }
    }
    out.push(path);
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn the_bpf_crate_imports_only_downward_and_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("proxy-ebpf/src");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let problems = violations(&files);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_finds_upward_imports_cycles_and_strays() {
    let f = |p: &str, t: &str| (p.to_string(), t.to_string());
    let files = [
        f("main.rs", "use services::sock;"),
        f("access/maps.rs", "use crate::flow::ct::Entry;"),
        f(
            "flow/ct.rs",
            "use crate::{\n    access::maps::X, // crate::hooks in a comment\n    flow::{nat, tc::Y},\n};",
        ),
        f("flow/nat.rs", "fn f() { crate::flow::ct::g() }"),
        f("flow/tc.rs", "use super::fib;"),
        f("flow/fib.rs", "use crate::headers::Tuple;"),
        f("headers/mod.rs", "pub mod family;"),
        f("headers/family.rs", "use super::{Packet, Tuple};"),
        f("packet.rs", ""),
    ];
    let problems = violations(&files);
    assert_eq!(
        problems,
        [
            "packet.rs: not in a layer folder (access, headers, flow, services, hooks)",
            "access/maps.rs: uses crate::flow::ct::Entry, a layer above its own (access)",
            "import cycle: flow/ct -> flow/nat -> flow/ct",
        ],
        "{problems:#?}"
    );
}

#[test]
fn use_trees_expand_into_paths() {
    let refs = references("use crate::{a::{self, b as c}, d::*};\nlet x = super::e::f(1);");
    let want: Vec<Vec<String>> = [
        vec!["crate", "a"],
        vec!["crate", "a", "b"],
        vec!["crate", "d", "*"],
        vec!["super", "e", "f"],
    ]
    .iter()
    .map(|p| p.iter().map(|s| s.to_string()).collect())
    .collect();
    assert_eq!(refs, want);
}

/// `unsafe` blocks and expressions of `text` without a `// SAFETY:` comment in the three lines
/// before them (or on their own line); `unsafe fn`, `unsafe impl` and attributes such as
/// `#[unsafe(no_mangle)]` are not blocks. As `line: text`.
fn unexplained_unsafe(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let blocks = code.match_indices("unsafe").any(|(at, _)| {
            let rest = code[at + "unsafe".len()..].trim_start();
            let before = code[..at].trim_end();
            rest.starts_with('{') && !before.ends_with("#[")
        });
        if !blocks {
            continue;
        }
        let explained = lines[i.saturating_sub(3)..=i]
            .iter()
            .any(|l| l.contains("SAFETY:"));
        if !explained {
            out.push(format!("{}: {}", i + 1, line.trim()));
        }
    }
    out
}

/// Issue #22: every `unsafe` block of the BPF crate says why it is sound.
#[test]
fn every_unsafe_block_of_the_bpf_crate_has_a_safety_comment() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("proxy-ebpf/src");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    let missing: Vec<String> = files
        .iter()
        .flat_map(|(path, text)| {
            unexplained_unsafe(text)
                .into_iter()
                .map(move |l| format!("{path}:{l}"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "unsafe without SAFETY:\n{}",
        missing.join("\n")
    );
    let bad = "fn f() {\n    let x = unsafe { g() };\n}\n";
    assert_eq!(unexplained_unsafe(bad), ["2: let x = unsafe { g() };"]);
    let good = "// SAFETY: g is sound here.\nlet x = unsafe { g() };\n#[unsafe(no_mangle)]\n";
    assert!(unexplained_unsafe(good).is_empty());
}
