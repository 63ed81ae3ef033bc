//! What packing asks of a module's text, answered by oxc: its syntax
//! errors (with line and column), TypeScript with its types erased and a
//! source map back to the author's lines, the specifiers an ES module
//! imports, and what a CommonJS module requires and exports.

use std::path::Path;

use oxc_allocator::Allocator;
use oxc_ast::ast::{
    Argument, AssignmentTarget, CallExpression, Expression, IdentifierReference,
    ObjectPropertyKind, PropertyKey, StaticMemberExpression,
};
use oxc_ast_visit::Visit;
use oxc_codegen::{Codegen, CodegenOptions};
use oxc_diagnostics::OxcDiagnostic;
use oxc_parser::Parser;
use oxc_semantic::{Scoping, SemanticBuilder};
use oxc_span::{SourceType, Span};
use oxc_transformer::{TransformOptions, Transformer};

/// A module that does not parse (or transform), located in the author's file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: SyntaxError: {message}")]
pub struct SyntaxError {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl SyntaxError {
    fn from_diagnostic(file: &str, source: &str, diagnostic: &OxcDiagnostic) -> Self {
        let offset = diagnostic
            .labels
            .as_ref()
            .and_then(|labels| labels.first())
            .map_or(0, |label| label.offset());
        let (line, column) = line_column(source, offset);
        Self {
            file: file.to_owned(),
            line,
            column,
            message: diagnostic.message.to_string(),
        }
    }
}

/// 1-based line and column of byte `offset` in `source`.
pub fn line_column(source: &str, offset: usize) -> (u32, u32) {
    let before = source.get(..offset.min(source.len())).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(column).unwrap_or(u32::MAX),
    )
}

/// JavaScript printed from a TypeScript module, and its source map (JSON).
#[derive(Debug, Clone)]
pub struct Transpiled {
    pub code: String,
    pub source_map: String,
}

/// Erases the types of the TypeScript module `file` (no type checking:
/// `tsc --noEmit` stays the author's tool) and maps the result back to it.
pub fn transpile_typescript(file: &str, source: &str) -> Result<Transpiled, SyntaxError> {
    let allocator = Allocator::default();
    let source_type = SourceType::from_path(file)
        .unwrap_or_else(|_| SourceType::ts())
        .with_module(!file.ends_with(".cts"));
    let parsed = Parser::new(&allocator, source, source_type).parse();
    if let Some(first) = parsed.errors.first() {
        return Err(SyntaxError::from_diagnostic(file, source, first));
    }
    let mut program = parsed.program;
    let semantic = SemanticBuilder::new()
        .with_excess_capacity(2.0)
        .build(&program);
    let scoping = semantic.semantic.into_scoping();
    let options = TransformOptions::default();
    let transformed = Transformer::new(&allocator, Path::new(file), &options)
        .build_with_scoping(scoping, &mut program);
    if let Some(first) = transformed.errors.first() {
        return Err(SyntaxError::from_diagnostic(file, source, first));
    }
    let printed = Codegen::new()
        .with_options(CodegenOptions {
            source_map_path: Some(file.into()),
            ..CodegenOptions::default()
        })
        .with_source_text(source)
        .build(&program);
    let source_map = printed
        .map
        .map(|map| map.to_json_string())
        .unwrap_or_default();
    Ok(Transpiled {
        code: printed.code,
        source_map,
    })
}

/// A specifier as written in a module, and where its string literal sits
/// (quotes included), so the packer can rewrite it in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenSpecifier {
    pub specifier: String,
    pub span: Option<(u32, u32)>,
}

/// What a module says about its imports and exports.
#[derive(Debug, Clone, Default)]
pub struct ModuleSyntax {
    /// ES module syntax (`import`/`export`) appears.
    pub is_module: bool,
    /// Static imports, re-exports and `import("literal")`, in source order.
    pub imports: Vec<WrittenSpecifier>,
    /// `require("literal")` of a free `require`, in source order, each once.
    pub requires: Vec<String>,
    /// Names a CommonJS module assigns to `exports.x` / `module.exports.x`,
    /// lists in `module.exports = {…}`, or defines on `exports`.
    pub export_names: Vec<String>,
    /// `module.exports = require("x")` and `__exportStar(require("x"), …)`:
    /// the module also exports what `x` does.
    pub reexports: Vec<String>,
    /// The free names `require`, `module` or `exports` appear: CommonJS.
    pub uses_commonjs: bool,
    /// The free identifier `process` is read (Node's global).
    pub uses_process: bool,
    /// `process.binding(…)`: Node internals no sandbox can give.
    pub uses_process_binding: bool,
}

/// Parses JavaScript module `file`: as an ES module when `as_module` is
/// `Some(true)`, as CommonJS when `Some(false)`, else by what it contains.
pub fn analyze(
    file: &str,
    source: &str,
    as_module: Option<bool>,
) -> Result<ModuleSyntax, SyntaxError> {
    let allocator = Allocator::default();
    let source_type = match as_module {
        Some(true) => SourceType::mjs(),
        Some(false) => SourceType::cjs(),
        None => SourceType::unambiguous(),
    };
    let mut parsed = Parser::new(&allocator, source, source_type).parse();
    if !parsed.errors.is_empty() && as_module.is_none() {
        // Top-level `return` is CommonJS only; try it as such.
        let retry = Parser::new(&allocator, source, SourceType::cjs()).parse();
        if retry.errors.is_empty() {
            parsed = retry;
        }
    }
    if let Some(first) = parsed.errors.first() {
        return Err(SyntaxError::from_diagnostic(file, source, first));
    }
    let record = &parsed.module_record;
    let mut syntax = ModuleSyntax {
        is_module: record.has_module_syntax,
        ..ModuleSyntax::default()
    };
    let mut imports: Vec<(u32, WrittenSpecifier)> = Vec::new();
    for (specifier, requests) in &record.requested_modules {
        for request in requests {
            imports.push((
                request.span.start,
                WrittenSpecifier {
                    specifier: specifier.to_string(),
                    span: Some((request.span.start, request.span.end)),
                },
            ));
        }
    }
    for dynamic in &record.dynamic_imports {
        let Span { start, end, .. } = dynamic.module_request;
        let text = source.get(start as usize..end as usize).unwrap_or_default();
        if let Some(literal) = string_literal(text) {
            imports.push((
                start,
                WrittenSpecifier {
                    specifier: literal,
                    span: Some((start, end)),
                },
            ));
        }
    }
    imports.sort_by_key(|(start, _)| *start);
    imports.dedup_by_key(|(start, _)| *start);
    syntax.imports = imports.into_iter().map(|(_, s)| s).collect();

    if !syntax.is_module {
        let semantic = SemanticBuilder::new().build(&parsed.program);
        let scoping = semantic.semantic.into_scoping();
        let mut visitor = CommonJsVisitor {
            scoping: &scoping,
            syntax: &mut syntax,
        };
        visitor.visit_program(&parsed.program);
    }
    Ok(syntax)
}

/// The value of a plain string literal (`'x'`, `"x"`, `` `x` ``), if that is all `text` is.
fn string_literal(text: &str) -> Option<String> {
    let text = text.trim();
    let quote = text.chars().next()?;
    if !matches!(quote, '"' | '\'' | '`') || text.len() < 2 || !text.ends_with(quote) {
        return None;
    }
    let inner = &text[1..text.len() - 1];
    let interpolated = quote == '`' && inner.contains("${");
    let plain = !(inner.contains(['\\', quote]) || interpolated);
    plain.then(|| inner.to_owned())
}

struct CommonJsVisitor<'s> {
    scoping: &'s Scoping,
    syntax: &'s mut ModuleSyntax,
}

impl CommonJsVisitor<'_> {
    /// `ident` is the free (undeclared) name `name`.
    fn is_free(&self, ident: &IdentifierReference<'_>, name: &str) -> bool {
        ident.name == name
            && ident
                .reference_id
                .get()
                .is_none_or(|id| self.scoping.get_reference(id).symbol_id().is_none())
    }

    fn is_free_expr(&self, expr: &Expression<'_>, name: &str) -> bool {
        matches!(expr, Expression::Identifier(ident) if self.is_free(ident, name))
    }

    /// `exports` or `module.exports`.
    fn is_exports(&self, expr: &Expression<'_>) -> bool {
        self.is_free_expr(expr, "exports")
            || matches!(expr, Expression::StaticMemberExpression(member)
                if member.property.name == "exports" && self.is_free_expr(&member.object, "module"))
    }

    fn is_module_exports_target(&self, target: &AssignmentTarget<'_>) -> bool {
        matches!(target, AssignmentTarget::StaticMemberExpression(member)
            if member.property.name == "exports" && self.is_free_expr(&member.object, "module"))
    }

    /// The literal of `require("x")` with a free `require`.
    fn required(&self, call: &CallExpression<'_>) -> Option<String> {
        let Expression::Identifier(callee) = &call.callee else {
            return None;
        };
        if !self.is_free(callee, "require") || call.arguments.len() != 1 {
            return None;
        }
        match &call.arguments[0] {
            Argument::StringLiteral(literal) => Some(literal.value.to_string()),
            Argument::TemplateLiteral(template) if template.expressions.is_empty() => template
                .quasis
                .first()
                .and_then(|quasi| quasi.value.cooked.as_ref())
                .map(ToString::to_string),
            _ => None,
        }
    }

    fn add_export(&mut self, name: &str) {
        if name != "default"
            && name != "__esModule"
            && !self.syntax.export_names.iter().any(|n| n == name)
        {
            self.syntax.export_names.push(name.to_owned());
        }
    }
}

impl<'a> Visit<'a> for CommonJsVisitor<'_> {
    fn visit_call_expression(&mut self, call: &CallExpression<'a>) {
        if let Some(specifier) = self.required(call)
            && !self.syntax.requires.contains(&specifier)
        {
            self.syntax.requires.push(specifier);
        }
        match &call.callee {
            // Object.defineProperty(exports, "name", …)
            Expression::StaticMemberExpression(member)
                if member.property.name == "defineProperty"
                    && self.is_free_expr(&member.object, "Object") =>
            {
                if let (Some(Argument::Identifier(target)), Some(Argument::StringLiteral(name))) =
                    (call.arguments.first(), call.arguments.get(1))
                    && self.is_free(target, "exports")
                {
                    let name = name.value.to_string();
                    self.add_export(&name);
                }
            }
            // __exportStar(require("x"), exports), as TypeScript emits it.
            Expression::Identifier(callee)
                if matches!(callee.name.as_str(), "__exportStar" | "__export") =>
            {
                if let Some(Argument::CallExpression(inner)) = call.arguments.first()
                    && let Some(specifier) = self.required(inner)
                {
                    self.syntax.reexports.push(specifier);
                }
            }
            _ => {}
        }
        oxc_ast_visit::walk::walk_call_expression(self, call);
    }

    fn visit_assignment_expression(&mut self, assignment: &oxc_ast::ast::AssignmentExpression<'a>) {
        if let AssignmentTarget::StaticMemberExpression(member) = &assignment.left
            && self.is_exports(&member.object)
        {
            let name = member.property.name.to_string();
            self.add_export(&name);
        }
        if self.is_module_exports_target(&assignment.left) {
            match &assignment.right {
                Expression::ObjectExpression(object) => {
                    for property in &object.properties {
                        if let ObjectPropertyKind::ObjectProperty(property) = property {
                            match &property.key {
                                PropertyKey::StaticIdentifier(key) => {
                                    let name = key.name.to_string();
                                    self.add_export(&name);
                                }
                                PropertyKey::StringLiteral(key) => {
                                    let name = key.value.to_string();
                                    self.add_export(&name);
                                }
                                _ => {}
                            }
                        }
                    }
                }
                Expression::CallExpression(call) => {
                    if let Some(specifier) = self.required(call) {
                        self.syntax.reexports.push(specifier);
                    }
                }
                _ => {}
            }
        }
        oxc_ast_visit::walk::walk_assignment_expression(self, assignment);
    }

    fn visit_static_member_expression(&mut self, member: &StaticMemberExpression<'a>) {
        if self.is_free_expr(&member.object, "process") && member.property.name == "binding" {
            self.syntax.uses_process_binding = true;
        }
        oxc_ast_visit::walk::walk_static_member_expression(self, member);
    }

    fn visit_identifier_reference(&mut self, ident: &IdentifierReference<'a>) {
        if self.is_free(ident, "process") {
            self.syntax.uses_process = true;
        }
        if ["require", "module", "exports"]
            .iter()
            .any(|name| self.is_free(ident, name))
        {
            self.syntax.uses_commonjs = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commonjs_requires_and_exports_are_found() {
        let source = r#"
            const a = require("./a");
            const { b } = require('b');
            function local(require) { return require("not-free"); }
            exports.one = 1;
            module.exports.two = 2;
            Object.defineProperty(exports, "three", { value: 3 });
            if (process.env.X) {}
        "#;
        let syntax = analyze("x.js", source, None).unwrap();
        assert!(!syntax.is_module);
        assert_eq!(syntax.requires, ["./a", "b"]);
        assert_eq!(syntax.export_names, ["one", "two", "three"]);
        assert!(syntax.uses_process && !syntax.uses_process_binding);
        let object = analyze(
            "y.js",
            "module.exports = { parse, valid: v, 'x-y': 1 };",
            None,
        )
        .unwrap();
        assert_eq!(object.export_names, ["parse", "valid", "x-y"]);
        let star = analyze("z.js", "module.exports = require('./inner')", None).unwrap();
        assert_eq!(star.reexports, ["./inner"]);
    }

    #[test]
    fn module_imports_come_in_source_order_with_their_spans() {
        let source =
            "import b from 'b';\nexport * from \"./a.js\";\nconst c = await import('./c.js');";
        let syntax = analyze("m.js", source, None).unwrap();
        assert!(syntax.is_module);
        let specifiers: Vec<_> = syntax
            .imports
            .iter()
            .map(|i| i.specifier.as_str())
            .collect();
        assert_eq!(specifiers, ["b", "./a.js", "./c.js"]);
        for import in &syntax.imports {
            let (start, end) = import.span.unwrap();
            assert_eq!(
                string_literal(&source[start as usize..end as usize]).unwrap(),
                import.specifier
            );
        }
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = analyze("bad.js", "export const x = 1;\nlet = = 2;", Some(true)).unwrap_err();
        assert_eq!((err.file.as_str(), err.line), ("bad.js", 2), "{err}");
        let err =
            transpile_typescript("bad.ts", "const x: number = 1;\nfunction (: {}").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
    }

    #[test]
    fn typescript_loses_its_types_and_keeps_a_map() {
        let out = transpile_typescript(
            "main.ts",
            "interface A { x: number }\nexport function f(a: A): number {\n  return a.x as number;\n}\n",
        )
        .unwrap();
        assert!(out.code.contains("export function f(a)"), "{}", out.code);
        assert!(!out.code.contains("interface"));
        assert!(
            out.source_map.contains("\"mappings\""),
            "{}",
            out.source_map
        );
    }
}
