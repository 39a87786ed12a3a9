//! Errors about user input: what is wrong, where (file:line:column), and how to fix it.
//!
//! Every refusal of a settings or rule file is a [`Diagnostic`]; the CLI prints them one per
//! line and exits 2. Warnings use the same type and never stop anything.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no position (e.g. a missing file)
    pub line: usize,
    /// 1-based; 0 when the problem has no position
    pub column: usize,
    /// what is wrong
    pub what: String,
    /// how to fix it
    pub fix: String,
}

impl Diagnostic {
    pub fn error(file: &Path, pos: Pos, what: impl Into<String>, fix: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            file: file.to_path_buf(),
            line: pos.line,
            column: pos.column,
            what: what.into(),
            fix: fix.into(),
        }
    }

    pub fn warning(file: &Path, pos: Pos, what: impl Into<String>, fix: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(file, pos, what, fix)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, ": {sev}: {}", self.what)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

/// A 1-based line/column position in a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub const NONE: Pos = Pos { line: 0, column: 0 };

    /// Position of byte offset `offset` in `text` (columns count characters).
    pub fn at(text: &str, offset: usize) -> Pos {
        let offset = offset.min(text.len());
        let before = &text[..text.floor_char_boundary(offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Pos {
            line,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

/// A refused input: one or more errors (and any warnings found on the way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub Vec<Diagnostic>);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Refused {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pos_counts_lines_and_chars() {
        let t = "a = 1\nbé = 2\n";
        assert_eq!(Pos::at(t, 0), Pos { line: 1, column: 1 });
        assert_eq!(Pos::at(t, 6), Pos { line: 2, column: 1 });
        // 'é' is two bytes but one column
        assert_eq!(Pos::at(t, 9), Pos { line: 2, column: 3 });
    }

    #[test]
    fn display_has_position_and_fix() {
        let d = Diagnostic::error(
            Path::new("r.toml"),
            Pos { line: 3, column: 7 },
            "bad",
            "do this",
        );
        assert_eq!(d.to_string(), "r.toml:3:7: error: bad; do this");
    }
}
