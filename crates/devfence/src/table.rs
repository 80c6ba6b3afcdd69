//! Plain-text tables: columns padded to their widest cell, no borders, so the
//! output reads well on a terminal and still greps and cuts cleanly.

use std::io::{self, Write};

/// A table under construction.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print as `-`.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Writes the table, header first.
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String], out: &mut dyn Write| -> io::Result<()> {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map_or("-", String::as_str);
                let c = if c.is_empty() { "-" } else { c };
                if i + 1 == n {
                    s.push_str(c);
                } else {
                    s.push_str(&format!("{c:<w$}  "));
                }
            }
            writeln!(out, "{}", s.trim_end())
        };
        line(&self.header, out)?;
        for r in &self.rows {
            line(r, out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns_and_fills_blanks() {
        let mut t = Table::new(&["A", "BB", "C"]);
        t.row(vec!["xxx".into(), String::new(), "z".into()]);
        t.row(vec!["y".into()]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A    BB  C\nxxx  -   z\ny    -   -\n"
        );
    }
}
