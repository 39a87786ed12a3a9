//! Rule files as written: strict TOML (unknown keys are errors), every value with its span so
//! that [`crate::policy`] can name `file:line:column` for any problem it finds (the items of
//! address lists are found in the text when needed, see [`Addresses`]).
//!
//! This module only reads; all checking of meaning happens in `policy`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_spanned::Spanned;

use crate::diag::{Diagnostic, Pos, Refused};

/// One parsed rule file.
#[derive(Debug, Clone)]
pub struct RuleFile {
    pub path: PathBuf,
    pub text: String,
    pub diverts: Vec<Spanned<RawDivert>>,
}

impl RuleFile {
    /// Position of a byte offset in this file.
    pub fn pos(&self, offset: usize) -> Pos {
        Pos::at(&self.text, offset)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    divert: Vec<Spanned<RawDivert>>,
}

/// A list of strings (`["a", "b"]`); a single string is accepted too.
pub type Strings = Spanned<OneOrMany<String>>;

/// Like [`Strings`], for the keys whose lists can be long (addresses): the items carry no span
/// of their own. The toml deserializer gives each `Spanned` item a map access of its own,
/// which was most of the time spent on a 10,000-address `dst`; [`offsets`] finds the items
/// in the file text instead, and only when a message needs one.
pub type Addresses = Spanned<StrList>;

/// A list of values, or one value on its own (`dport = 80`). Items of a list keep their own
/// spans; a single value has the span of the whole.
#[derive(Debug, Clone)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<Spanned<T>>),
}

/// The items of a spanned [`OneOrMany`], each with the byte offset to report it at.
pub fn items<T>(v: &Spanned<OneOrMany<T>>) -> Vec<(usize, &T)> {
    match v.get_ref() {
        OneOrMany::One(t) => vec![(v.span().start, t)],
        OneOrMany::Many(items) => items
            .iter()
            .map(|i| (i.span().start, i.get_ref()))
            .collect(),
    }
}

/// A list-valued key as [`crate::policy`] checks it: its items, and where each is written.
pub trait List {
    type Item: ?Sized;
    /// Where the value (the list, or the lone item) starts.
    fn start(&self) -> usize;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn values(&self) -> impl Iterator<Item = &Self::Item>;
    /// The byte offset of each item in `text`, the text of the file the list was read from.
    fn offsets(&self, text: &str) -> Vec<usize>;
}

impl<T> List for Spanned<OneOrMany<T>> {
    type Item = T;
    fn start(&self) -> usize {
        self.span().start
    }
    fn len(&self) -> usize {
        match self.get_ref() {
            OneOrMany::One(_) => 1,
            OneOrMany::Many(v) => v.len(),
        }
    }
    fn values(&self) -> impl Iterator<Item = &T> {
        items(self).into_iter().map(|(_, t)| t)
    }
    fn offsets(&self, _text: &str) -> Vec<usize> {
        items(self).into_iter().map(|(at, _)| at).collect()
    }
}

impl List for Addresses {
    type Item = str;
    fn start(&self) -> usize {
        self.span().start
    }
    fn len(&self) -> usize {
        self.get_ref().len()
    }
    fn values(&self) -> impl Iterator<Item = &str> {
        self.get_ref().iter()
    }
    fn offsets(&self, text: &str) -> Vec<usize> {
        offsets(self, text)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IntoDeserializer, SeqAccess, Visitor};
        use std::marker::PhantomData;

        // Hand-written rather than `#[serde(untagged)]`: untagged buffers the input and so
        // loses the spans of the list items.
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<T>>()? {
                    out.push(item);
                }
                Ok(OneOrMany::Many(out))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::deserialize(v.into_deserializer()).map(OneOrMany::One)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The items of an [`Addresses`] value: a list of strings, or one string on its own.
#[derive(Debug, Clone, Default)]
pub struct StrList {
    /// The items back to back: one allocation for the list, not one per item.
    buf: String,
    /// where each item ends in `buf`
    ends: Vec<usize>,
    /// written as one string, not as a list (its position is then the value's own)
    one: bool,
}

impl StrList {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> {
        (0..self.ends.len()).map(|i| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            &self.buf[start..self.ends[i]]
        })
    }

    fn push(&mut self, s: &str) {
        self.buf.push_str(s);
        self.ends.push(self.buf.len());
    }
}

/// The byte offset in `text` (the file the value was read from) of each item of `list`, in
/// order. Scans the list's own text, so only worth calling when an item has to be reported.
pub fn offsets(list: &Addresses, text: &str) -> Vec<usize> {
    let start = list.span().start;
    let n = list.get_ref().len();
    if list.get_ref().one {
        return vec![start; n];
    }
    match scan_string_array(text, start) {
        Some(at) if at.len() == n => at,
        // Cannot happen for text toml accepted as a list of strings; the list's own position
        // is still a correct place to point at.
        _ => vec![start; n],
    }
}

/// Start offsets of the items of the TOML array of strings that opens at `text[start]`
/// (`[`); `None` when the text there is not such an array.
fn scan_string_array(text: &str, start: usize) -> Option<Vec<usize>> {
    let b = text.as_bytes();
    if b.get(start) != Some(&b'[') {
        return None;
    }
    let mut out = Vec::new();
    let mut i = start + 1;
    loop {
        match *b.get(i)? {
            b' ' | b'\t' | b'\r' | b'\n' | b',' => i += 1,
            b'#' => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n)
            }
            b']' => return Some(out),
            q @ (b'"' | b'\'') => {
                out.push(i);
                i = string_end(b, i, q)?;
            }
            _ => return None,
        }
    }
}

/// The offset just past the TOML string (basic or literal, one- or multi-line) that starts at
/// `b[i]` with the quote `q`.
fn string_end(b: &[u8], i: usize, q: u8) -> Option<usize> {
    let escapes = q == b'"';
    let three = [q; 3];
    if b[i..].starts_with(&three) {
        let mut j = i + 3;
        loop {
            match *b.get(j)? {
                b'\\' if escapes => j += 2,
                c if c == q && b[j..].starts_with(&three) => {
                    // up to two more quotes right before the closing ones belong to the text
                    let mut end = j + 3;
                    while end < j + 5 && b.get(end) == Some(&q) {
                        end += 1;
                    }
                    return Some(end);
                }
                _ => j += 1,
            }
        }
    }
    let mut j = i + 1;
    loop {
        match *b.get(j)? {
            b'\\' if escapes => j += 2,
            c if c == q => return Some(j + 1),
            _ => j += 1,
        }
    }
}

impl<'de> Deserialize<'de> for StrList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{DeserializeSeed, Error, SeqAccess, Unexpected, Visitor};

        // Accepts and refuses exactly what `OneOrMany<String>` does, with the same messages.
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrList, A::Error> {
                let mut list = StrList::default();
                list.ends.reserve(seq.size_hint().unwrap_or(0));
                while seq.next_element_seed(Append(&mut list))?.is_some() {}
                Ok(list)
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<StrList, E> {
                let mut list = StrList {
                    one: true,
                    ..StrList::default()
                };
                list.push(v);
                Ok(list)
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<StrList, E> {
                Err(E::invalid_type(Unexpected::Signed(v), &"a string"))
            }
        }

        /// One item of the list, appended to it as it is read (no `String` of its own).
        struct Append<'a>(&'a mut StrList);
        impl<'de> DeserializeSeed<'de> for Append<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_str(self)
            }
        }
        impl<'de> Visitor<'de> for Append<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<(), E> {
                self.0.push(v);
                Ok(())
            }
        }

        d.deserialize_any(V)
    }
}

/// `[[divert]]` exactly as written. See docs/configuration.md for each key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDivert {
    pub name: Spanned<String>,
    pub from: Option<Strings>,
    pub proto: Option<Spanned<String>>,
    /// ports: integers or "lo-hi" strings
    pub dport: Option<Spanned<OneOrMany<toml::Value>>>,
    pub dst: Option<Addresses>,
    pub src: Option<Addresses>,
    pub except_src: Option<Addresses>,
    pub except_dst: Option<Addresses>,
    /// source MAC addresses (extension)
    pub src_mac: Option<Addresses>,
    /// 802.1Q VLAN ids (extension)
    pub vlan: Option<Spanned<OneOrMany<i64>>>,
    pub action: Spanned<String>,
    pub port: Option<Spanned<i64>>,
    pub address: Option<Spanned<String>>,
    pub fwmark: Option<Spanned<i64>>,
    pub decide: Option<Spanned<String>>,
    pub arp_shield: Option<Spanned<bool>>,
    pub health: Option<Spanned<RawHealth>>,
    pub on_unhealthy: Option<Spanned<String>>,
    /// `action = "dr"`: the realservers to forward to
    pub realservers: Option<Spanned<Vec<Spanned<RawRealserver>>>>,
}

/// One realserver of a `dr` rule: `{ mac = "02:00:00:00:00:31" }` and/or
/// `{ address = "10.0.0.31" }` (MAC learned from the neighbour table), with an optional
/// `health` check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRealserver {
    pub mac: Option<Spanned<String>>,
    pub address: Option<Spanned<String>>,
    pub health: Option<Spanned<RawHealth>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// required, except on a realserver given by `address` (then `address:<first dport>`)
    pub connect: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub fall: Option<Spanned<i64>>,
    pub rise: Option<Spanned<i64>>,
}

/// Read and parse one rule file. Syntax, type and unknown-key errors are refused here.
pub fn read(path: &Path) -> Result<RuleFile, Refused> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Refused(vec![Diagnostic::error(
            path,
            Pos::NONE,
            format!("cannot read rule file: {e}"),
            "check the path and its permissions",
        )])
    })?;
    parse(path, text)
}

/// Parse rule-file text (`path` is only used in messages).
pub fn parse(path: &Path, text: String) -> Result<RuleFile, Refused> {
    match toml::from_str::<RawFile>(&text) {
        Ok(raw) => Ok(RuleFile {
            path: path.to_path_buf(),
            text,
            diverts: raw.divert,
        }),
        Err(e) => {
            let pos = e.span().map_or(Pos::NONE, |s| Pos::at(&text, s.start));
            let what = e.message().trim().to_string();
            Err(Refused(vec![Diagnostic::error(
                path,
                pos,
                what.clone(),
                fix_for_parse_error(&what),
            )]))
        }
    }
}

fn fix_for_parse_error(msg: &str) -> &'static str {
    if msg.contains("unknown field") {
        "remove or correct the key (keys are listed in docs/configuration.md)"
    } else if msg.contains("missing field") {
        "add the key; every [[divert]] needs `name` and `action`"
    } else if msg.contains("invalid type") || msg.contains("did not match any variant") {
        "give the value the type docs/configuration.md lists for this key"
    } else {
        "fix the TOML syntax at this position"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("t.toml"), text.into())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_key_has_position() {
        let e = err("[[divert]]\nname = \"a\"\naction = \"pass\"\nbogus = 1\n");
        assert!(e.starts_with("t.toml:4:1: error:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn wrong_type_has_position() {
        let e = err("[[divert]]\nname = 5\naction = \"pass\"\n");
        assert!(e.starts_with("t.toml:2:8: error:"), "{e}");
    }

    #[test]
    fn missing_action() {
        let e = err("[[divert]]\nname = \"a\"\n");
        assert!(e.contains("action"), "{e}");
        assert!(e.contains("t.toml:1:1"), "{e}");
    }

    #[test]
    fn syntax_error() {
        let e = err("[[divert]\n");
        assert!(e.starts_with("t.toml:1:"), "{e}");
    }

    #[test]
    fn top_level_unknown_table() {
        let e = err("[[diverts]]\nname = \"a\"\n");
        assert!(e.contains("diverts"), "{e}");
    }

    #[test]
    fn one_or_many() {
        let f = parse(
            Path::new("t.toml"),
            "[[divert]]\nname = \"a\"\naction = \"pass\"\nfrom = \"eth1\"\ndport = 80\n".into(),
        )
        .unwrap();
        let d = f.diverts[0].get_ref();
        assert_eq!(items(d.from.as_ref().unwrap()).len(), 1);
        assert_eq!(items(d.dport.as_ref().unwrap()).len(), 1);
        let f = parse(
            Path::new("t.toml"),
            "[[divert]]\nname = \"a\"\naction = \"pass\"\nfrom = [\"a\", \"b\"]\n".into(),
        )
        .unwrap();
        let d = f.diverts[0].get_ref();
        let it = items(d.from.as_ref().unwrap());
        assert_eq!(it.len(), 2);
        assert_eq!(
            f.pos(it[1].0),
            Pos {
                line: 4,
                column: 14
            }
        );
    }

    /// The same value read as `Strings` (a span per item) and as `Addresses` (spans found by
    /// scanning the text): same items at the same offsets, or the same error at the same span.
    /// Whether the value was accepted.
    fn same_as_spanned(value: &str) -> bool {
        #[derive(Debug, Deserialize)]
        struct Old {
            v: Strings,
        }
        #[derive(Debug, Deserialize)]
        struct New {
            v: Addresses,
        }
        let text = format!("x = 1 # \"[\n v  =  {value}\n");
        match (toml::from_str::<Old>(&text), toml::from_str::<New>(&text)) {
            (Ok(old), Ok(new)) => {
                let old = items(&old.v);
                let values: Vec<&str> = new.v.get_ref().iter().collect();
                let old_values: Vec<&str> = old.iter().map(|(_, s)| s.as_str()).collect();
                assert_eq!(values, old_values, "{text}");
                let old_at: Vec<usize> = old.iter().map(|(at, _)| *at).collect();
                assert_eq!(offsets(&new.v, &text), old_at, "{text}");
                true
            }
            (Err(old), Err(new)) => {
                assert_eq!(new.message(), old.message(), "{text}");
                assert_eq!(new.span(), old.span(), "{text}");
                false
            }
            (old, new) => panic!("{text}: {old:?} but {new:?}"),
        }
    }

    #[test]
    fn addresses_items_where_spans_put_them() {
        for v in [
            r#""10.0.0.1""#,
            r#"'10.0.0.1'"#,
            r#"[]"#,
            r#"[ ]"#,
            r#"["a"]"#,
            r#"["a", "b",]"#,
            "[\n  \"a\", # a \"comment\" with ] and ,\n  'b' ,\r\n\t\"c\"\n]",
            r#"["a\"b", "\\", "\u00e9#]", 'c\', "é,"]"#,
            r#"["""
x""y\"""""", ""]"#,
            r#"['''a''b''''', '''
]#'''  , """"""", "x"]"#,
            "[\"\"\"line\\\n  continued\"\"\", \"z\"]",
        ] {
            assert!(same_as_spanned(v), "{v}");
        }
    }

    #[test]
    fn addresses_refused_as_strings_are() {
        for v in [
            "5",
            "true",
            "1.5",
            "1979-05-27",
            "{ a = 1 }",
            "[1]",
            r#"["a", 2]"#,
            r#"["a", ["b"]]"#,
            r#"["a", { b = 1 }]"#,
            "[1979-05-27]",
            r#"["a" "b"]"#,
            r#"["a""#,
        ] {
            assert!(!same_as_spanned(v), "{v}");
        }
    }

    use proptest::prelude::*;

    /// One TOML string token, in any of the four forms.
    fn toml_string() -> impl Strategy<Value = String> {
        let chars: Vec<char> = "a #,[]'\"\\é\n\t".chars().collect();
        let content = proptest::collection::vec(proptest::sample::select(chars), 0..6);
        (content, 0..4u8, 0..3usize).prop_map(|(c, form, quotes)| {
            let plain: String = c.iter().filter(|c| !"'\"\\\n\t".contains(**c)).collect();
            match form {
                0 => {
                    let mut s = String::from("\"");
                    for ch in &c {
                        match ch {
                            '"' => s.push_str("\\\""),
                            '\\' => s.push_str("\\\\"),
                            '\n' => s.push_str("\\n"),
                            '\t' => s.push_str("\\t"),
                            _ => s.push(*ch),
                        }
                    }
                    s + "\""
                }
                1 => format!("'{plain}'"),
                // multi-line: raw newlines, an escaped quote, and one or two quotes right
                // before the closing ones
                2 => format!("\"\"\"{plain}\n\\\"{}\"\"\"", "\"".repeat(quotes)),
                _ => format!("'''\n{plain}\n{}'''", "'".repeat(quotes)),
            }
        })
    }

    /// What may come between the items of an array.
    fn gap() -> impl Strategy<Value = String> {
        let piece = proptest::sample::select(vec![" ", "\t", "\n", "\r\n", "# c \"'],[\n"]);
        proptest::collection::vec(piece, 0..3).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn addresses_items_found_in_any_array(
            items in proptest::collection::vec((gap(), toml_string(), gap()), 0..6),
            trailing_comma in any::<bool>(),
            end in gap(),
        ) {
            let body: Vec<String> = items.iter().map(|(a, s, b)| format!("{a}{s}{b}")).collect();
            let comma = if trailing_comma && !body.is_empty() { "," } else { "" };
            let value = format!("[{}{comma}{end}]", body.join(","));
            prop_assert!(same_as_spanned(&value), "{}", value);
        }
    }
}
