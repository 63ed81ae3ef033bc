//! Stacks that point at the author's code. A bundle carries a source map
//! (`<module>.map`) for each module that was printed from TypeScript; a
//! stack's `module:line:column` positions in such a module are rewritten to
//! the lines and columns the author wrote.

use std::collections::BTreeMap;

use oxc_sourcemap::SourceMap;

/// The extension of a module's source map inside a bundle.
pub const MAP_SUFFIX: &str = ".map";

/// The source maps of one bundle, parsed once.
#[derive(Debug, Default)]
pub struct SourceMaps {
    maps: BTreeMap<String, SourceMap>,
}

impl SourceMaps {
    /// Reads every `<module>.map` among a bundle's files; unreadable maps are skipped.
    pub fn from_files(files: &BTreeMap<String, String>) -> Self {
        let maps = files
            .iter()
            .filter_map(|(path, text)| {
                let module = path.strip_suffix(MAP_SUFFIX)?;
                files.contains_key(module).then_some(())?;
                let map = SourceMap::from_json_string(text).ok()?;
                Some((module.to_owned(), map))
            })
            .collect();
        Self { maps }
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// `stack` with each `module:line[:column]` of a mapped module moved to
    /// the author's position (1-based, as stacks show them).
    pub fn remap(&self, stack: &str) -> String {
        if self.maps.is_empty() {
            return stack.to_owned();
        }
        stack
            .split_inclusive('\n')
            .map(|line| self.remap_line(line))
            .collect()
    }

    fn remap_line(&self, line: &str) -> String {
        for (module, map) in &self.maps {
            let needle = format!("{module}:");
            let Some(at) = line.find(&needle) else {
                continue;
            };
            // The module's name must stand alone: after a space, '(' or the start.
            if at > 0 && !line[..at].ends_with([' ', '(']) {
                continue;
            }
            let rest = &line[at + needle.len()..];
            let (line_no, after_line) = leading_number(rest);
            let Some(line_no) = line_no else { continue };
            let (column, after_column) = match after_line.strip_prefix(':') {
                Some(tail) => match leading_number(tail) {
                    (Some(column), tail) => (column, tail),
                    (None, _) => (1, after_line),
                },
                None => (1, after_line),
            };
            let table = map.generate_lookup_table();
            let Some(token) =
                map.lookup_token(&table, line_no.saturating_sub(1), column.saturating_sub(1))
            else {
                continue;
            };
            let source = token
                .get_source_id()
                .and_then(|id| map.get_source(id))
                .map_or_else(|| module.clone(), ToString::to_string);
            return format!(
                "{}{source}:{}:{}{after_column}",
                &line[..at],
                token.get_src_line() + 1,
                token.get_src_col() + 1
            );
        }
        line.to_owned()
    }
}

fn leading_number(text: &str) -> (Option<u32>, &str) {
    let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    (text[..digits].parse().ok(), &text[digits..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typescript_positions_come_back_to_the_authors_lines() {
        let source = "type Name = string;\n\ninterface Args {\n  name: Name;\n}\n\nexport function hello(args: Args): string {\n  throw new Error(`no ${args.name}`);\n}\n";
        let out = crate::syntax::transpile_typescript("main.ts", source).unwrap();
        let generated_line = out.code.lines().position(|l| l.contains("throw")).unwrap() + 1;
        let column = out
            .code
            .lines()
            .nth(generated_line - 1)
            .unwrap()
            .find("throw")
            .unwrap()
            + 1;
        let files = BTreeMap::from([
            ("main.ts".to_owned(), out.code.clone()),
            ("main.ts.map".to_owned(), out.source_map.clone()),
        ]);
        let maps = SourceMaps::from_files(&files);
        let stack =
            format!("    at hello (main.ts:{generated_line}:{column})\n    at other.js:3:1\n");
        let remapped = maps.remap(&stack);
        assert!(
            remapped.starts_with("    at hello (main.ts:8:3)\n"),
            "{remapped}"
        );
        assert!(remapped.ends_with("    at other.js:3:1\n"), "{remapped}");
    }
}
