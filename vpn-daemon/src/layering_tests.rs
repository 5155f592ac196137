//! The crate's layering, checked on its source: no import circle among
//! the top-level modules, and the leaves import nothing from the crate.
//! A `crate::` path anywhere in a module's non-test code (doc links
//! included) is a dependency.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Modules that must not import from the rest of the crate.
const LEAVES: &[&str] = &[
    "api",
    "packet",
    "proto",
    "paths",
    "events",
    "mac",
    "unix_users",
    "telemetry",
    "privileges",
    "resources",
    "files",
    "profile",
];

/// The top-level modules each top-level module uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("src is readable") {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                if !p.ends_with("bin") {
                    stack.push(p);
                }
                continue;
            }
            let rel = p.strip_prefix(&src).expect("under src");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("a file name")
                .trim_end_matches(".rs")
                .to_owned();
            if top == "lib" || top.ends_with("_tests") || p.extension() != Some("rs".as_ref()) {
                continue;
            }
            let text = std::fs::read_to_string(&p).expect("source is readable");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let deps = g.entry(top.clone()).or_default();
            deps.extend(crate_paths(code).into_iter().filter(|d| *d != top));
        }
    }
    let mods: BTreeSet<String> = g.keys().cloned().collect();
    for deps in g.values_mut() {
        deps.retain(|d| mods.contains(d));
    }
    g
}

/// The first segment of every `crate::` path in `code`, including each
/// item of `crate::{a::.., b, ..}` groups.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut expect) = (1, true);
            let mut chars = group.char_indices();
            while let Some((j, c)) = chars.next() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect = true,
                    c if depth == 1 && expect && (c.is_alphanumeric() || c == '_') => {
                        let name = ident(&group[j..]);
                        for _ in 1..name.len() {
                            chars.next();
                        }
                        out.insert(name);
                        expect = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("self");
    out.remove("");
    out
}

/// The strongly connected components with more than one module.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: finish order on g, then components on the reverse graph.
    fn visit<'a>(
        g: &'a BTreeMap<String, BTreeSet<String>>,
        n: &'a str,
        seen: &mut BTreeSet<&'a str>,
        out: &mut Vec<&'a str>,
    ) {
        if seen.insert(n) {
            for m in &g[n] {
                visit(g, m, seen, out);
            }
            out.push(n);
        }
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for n in g.keys() {
        visit(g, n, &mut seen, &mut order);
    }
    let mut rev: BTreeMap<String, BTreeSet<String>> =
        g.keys().map(|k| (k.clone(), BTreeSet::new())).collect();
    for (a, deps) in g {
        for b in deps {
            rev.get_mut(b).expect("a module").insert(a.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for n in order.iter().rev() {
        let mut comp = Vec::new();
        visit(&rev, n, &mut seen, &mut comp);
        if comp.len() > 1 {
            out.push(comp.into_iter().map(str::to_owned).collect());
        }
    }
    out
}

#[test]
fn no_import_circle_among_the_modules() {
    let g = graph();
    assert!(g.len() > 10, "{g:?}");
    assert_eq!(cycles(&g), Vec::<Vec<String>>::new(), "{g:#?}");
}

#[test]
fn the_leaves_import_nothing_from_the_crate() {
    let g = graph();
    for leaf in LEAVES {
        let deps = g.get(*leaf).unwrap_or_else(|| panic!("no module {leaf}"));
        assert!(deps.is_empty(), "{leaf} imports {deps:?}");
    }
}

#[test]
fn the_checker_sees_paths_and_groups() {
    let code = "use crate::{a::X, b, c::{d, e}};\nfn f() { crate::g::h(); }";
    let got: Vec<_> = crate_paths(code).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "g"]);
    let circle: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    let found = cycles(&circle);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].len(), 3);
}
