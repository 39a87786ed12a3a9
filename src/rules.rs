//! Rule files as written: strict TOML (unknown keys are errors), every value with its span so
//! that [`crate::policy`] can name `file:line:column` for any problem it finds.
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

/// `[[divert]]` exactly as written. See docs/configuration.md for each key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDivert {
    pub name: Spanned<String>,
    pub from: Option<Strings>,
    pub proto: Option<Spanned<String>>,
    /// ports: integers or "lo-hi" strings
    pub dport: Option<Spanned<OneOrMany<toml::Value>>>,
    pub dst: Option<Strings>,
    pub src: Option<Strings>,
    pub except_src: Option<Strings>,
    pub except_dst: Option<Strings>,
    /// source MAC addresses (extension)
    pub src_mac: Option<Strings>,
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
}
